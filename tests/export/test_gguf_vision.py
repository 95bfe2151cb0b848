"""GGUF export of vision-language models (issue 29 item 5): `loratune export gguf` of a VLM with
a merged adapter writes the language model (`<name>.gguf`, the family's text architecture) and
`mmproj-<name>.gguf` (llama.cpp's clip architecture). Checked here: the text GGUF's logits
through our loader equal the merged model's language model on text; the mmproj's tensors are
the vision tower's and projector's (by name, shape, values, with GGUFReader); its clip.* keys
are the ones llama.cpp's tools/mtmd/clip.cpp reads for the projector type (clip_model_loader::
load_hparams / load_tensors, read in the source: no llama.cpp binary runs here)."""

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

import vision_models  # noqa: E402

from loratune.adapters import add_adapter, merge_and_unload, save_adapter  # noqa: E402
from loratune.cli import main  # noqa: E402
from loratune.config import LoraConfig  # noqa: E402
from loratune.export.gguf_arch import GGUFExportError  # noqa: E402
from loratune.export.gguf_vision import NOT_WRITTEN, write_vlm_gguf  # noqa: E402
from loratune.models.vision import FAMILIES, load_vision_model  # noqa: E402
from tiny import randomize_lora  # noqa: E402

WRITTEN = ["gemma3", "qwen2_5_vl", "idefics3", "smolvlm"]
TEXT_ARCH = {"gemma3": "gemma3", "qwen2_5_vl": "qwen2vl", "idefics3": "llama",
             "smolvlm": "llama"}
PROJECTOR = {"gemma3": "gemma3", "qwen2_5_vl": "qwen2.5vl_merger", "idefics3": "idefics3",
             "smolvlm": "idefics3"}
# clip.cpp load_hparams: get_u32/get_f32 with required=true, plus image_mean / image_std
# (GGML_ASSERT) and the projector type; then the keys it reads per projector type.
REQUIRED = ["clip.projector_type", "clip.vision.embedding_length",
            "clip.vision.attention.head_count", "clip.vision.feed_forward_length",
            "clip.vision.block_count", "clip.vision.projection_dim",
            "clip.vision.attention.layer_norm_epsilon", "clip.vision.image_size",
            "clip.vision.patch_size", "clip.vision.image_mean", "clip.vision.image_std"]
# clip.cpp load_tensors: per block attn_q/k/v/out and ffn_up/down are required
BLOCK = {"attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_out.weight",
         "ffn_up.weight", "ffn_down.weight"}
# ... and per projector type (load_tensors' switch)
PROJECTOR_TENSORS = {"gemma3": {"mm.input_projection.weight", "mm.soft_emb_norm.weight"},
                     "qwen2_5_vl": {"mm.0.weight", "mm.0.bias", "mm.2.weight", "mm.2.bias",
                                    "v.patch_embd.weight", "v.patch_embd.weight.1"},
                     "idefics3": {"mm.model.fc.weight"}, "smolvlm": {"mm.model.fc.weight"}}


def _adapted(folder, tmp_path):
    """An adapter on the language model, the vision tower and the projector (nonzero B), and
    the merged model it stands for."""
    model, _, _ = load_vision_model(folder)
    family = FAMILIES[model.config.model_type]
    gemma = family.model_type == "gemma3"  # its projector has no linear layer: saved whole
    targets = ["language", "vision"] + ([] if gemma else ["projector"])
    add_adapter(model, LoraConfig(target_modules=targets, r=4, lora_alpha=8,
                                  modules_to_save=["projector"] if gemma else []))
    randomize_lora(model, seed=3)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # the saved projector changed too, so the file must carry it
        for n, p in model.named_parameters():
            if p.requires_grad and family.projector.split(".")[-1] in n and "lora_" not in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    adapter = save_adapter(model, tmp_path / "adapter")
    merged = merge_and_unload(model).eval()
    base, _, _ = load_vision_model(folder)
    for part in (family.vision, family.projector):  # the adapter changed both sides
        before, after = base.get_submodule(part), merged.get_submodule(part)
        assert any(not torch.equal(a, b) for a, b in
                   zip(before.state_dict().values(), after.state_dict().values())), part
    return adapter, merged


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            folder = getattr(vision_models, f"tiny_{name}")(root / name)
            adapter, merged = _adapted(folder, root)
            out = root / f"{name}.gguf"
            assert main(["export", "gguf", "--model", str(folder), "--adapter", str(adapter),
                         "--out", str(out), "--type", "f32"]) == 0
            cache[name] = folder, merged, out, root / f"mmproj-{name}.gguf"
        return cache[name]
    return get


def _read(path):
    reader = gguf.GGUFReader(str(path))
    return ({k: f.contents() for k, f in reader.fields.items()},
            {t.name: t for t in reader.tensors})


def _values(t) -> torch.Tensor:
    return torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(
        list(reversed(t.shape.tolist()))))


def _expected_mmproj(name: str, merged) -> dict[str, torch.Tensor]:
    """llama.cpp's tensor of each vision / projector weight of the merged model, as its
    convert_hf_to_gguf.py writes it (written out here by hand, not through gguf-py's map)."""
    family = FAMILIES[name]
    state = {k: v for k, v in merged.state_dict().items()
             if k.startswith((family.vision + ".", family.projector + "."))}
    out = {}
    for k, v in state.items():
        for pattern, new in _RENAMES[name]:
            m = pattern.fullmatch(k)
            if m:
                for gname, t in new(m, v):
                    out[gname] = t
                break
        else:
            if ".head." not in k:  # Gemma 3's unused SigLIP head
                raise AssertionError(f"no expected name for {k}")
    return out


def _rn(fmt):
    return lambda m, v: [(fmt.format(*m.groups()), v)]


def _qkv(m, v):
    return [(f"v.blk.{m.group(1)}.attn_{p}.{m.group(2)}", c) for p, c in zip("qkv", v.chunk(3))]


def _siglip(tower, proj):
    import re
    b = re.escape(tower) + r"\.encoder\.layers\.(\d+)\."
    return [(re.compile(b + r"self_attn\.(q|k|v)_proj\.(weight|bias)"),
             lambda m, v: [(f"v.blk.{m.group(1)}.attn_{m.group(2)}.{m.group(3)}", v)]),
            (re.compile(b + r"self_attn\.out_proj\.(weight|bias)"), _rn("v.blk.{}.attn_out.{}")),
            (re.compile(b + r"layer_norm(1|2)\.(weight|bias)"), _rn("v.blk.{}.ln{}.{}")),
            (re.compile(b + r"mlp\.fc1\.(weight|bias)"), _rn("v.blk.{}.ffn_up.{}")),
            (re.compile(b + r"mlp\.fc2\.(weight|bias)"), _rn("v.blk.{}.ffn_down.{}")),
            (re.compile(re.escape(tower) + r"\.embeddings\.patch_embedding\.(weight|bias)"),
             _rn("v.patch_embd.{}")),
            (re.compile(re.escape(tower) + r"\.embeddings\.position_embedding\.weight"),
             _rn("v.position_embd.weight")),
            (re.compile(re.escape(tower) + r"\.post_layernorm\.(weight|bias)"),
             _rn("v.post_ln.{}"))] + proj


def _renames():
    import re
    q = r"model\.visual\.blocks\.(\d+)\."
    qwen = [(re.compile(q + r"attn\.qkv\.(weight|bias)"), _qkv),
            (re.compile(q + r"attn\.proj\.(weight|bias)"), _rn("v.blk.{}.attn_out.{}")),
            (re.compile(q + r"norm(1|2)\.weight"), _rn("v.blk.{}.ln{}.weight")),
            (re.compile(q + r"mlp\.(gate|up|down)_proj\.(weight|bias)"),
             _rn("v.blk.{}.ffn_{}.{}")),
            (re.compile(r"model\.visual\.patch_embed\.proj\.weight"),
             lambda m, v: [("v.patch_embd.weight", v[:, :, 0]),
                           ("v.patch_embd.weight.1", v[:, :, 1])]),
            (re.compile(r"model\.visual\.merger\.ln_q\.weight"), _rn("v.post_ln.weight")),
            (re.compile(r"model\.visual\.merger\.mlp\.(0|2)\.(weight|bias)"), _rn("mm.{}.{}"))]
    gemma = _siglip("model.vision_tower", [
        (re.compile(r"model\.multi_modal_projector\.mm_input_projection_weight"),
         _rn("mm.input_projection.weight")),
        (re.compile(r"model\.multi_modal_projector\.mm_soft_emb_norm\.weight"),
         lambda m, v: [("mm.soft_emb_norm.weight", v + 1)])])  # Gemma's RMSNorm: 1 + w
    idefics = _siglip("model.vision_model", [
        (re.compile(r"model\.connector\.modality_projection\.proj\.weight"),
         _rn("mm.model.fc.weight"))])
    return {"gemma3": gemma, "qwen2_5_vl": qwen, "idefics3": idefics, "smolvlm": idefics}


_RENAMES = _renames()


@pytest.mark.parametrize("name", WRITTEN)
def test_mmproj_tensors_are_the_vision_tower_and_projector(name, exported):
    _, merged, _, mmproj = exported(name)
    _, tensors = _read(mmproj)
    want = _expected_mmproj(name, merged)
    assert set(tensors) == set(want)
    for gname, t in want.items():
        got = _values(tensors[gname])
        assert tuple(got.shape) == tuple(t.shape), gname
        torch.testing.assert_close(got, t.float(), rtol=0, atol=0, msg=gname)


@pytest.mark.parametrize("name", WRITTEN)
def test_mmproj_holds_what_clip_cpp_requires(name, exported):
    folder, merged, _, mmproj = exported(name)
    fields, tensors = _read(mmproj)
    assert fields["general.architecture"] == "clip"
    assert fields["clip.has_vision_encoder"] is True
    missing = [k for k in REQUIRED if k not in fields]
    assert not missing
    cfg = merged.config
    v = cfg.vision_config
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    assert fields["clip.projector_type"] == PROJECTOR[name]
    assert fields["clip.vision.projection_dim"] == cfg.text_config.hidden_size
    assert fields["clip.vision.embedding_length"] == v.hidden_size
    assert fields["clip.vision.feed_forward_length"] == v.intermediate_size
    layers = getattr(v, "num_hidden_layers", None) or v.depth
    assert fields["clip.vision.block_count"] == layers
    assert fields["clip.vision.attention.head_count"] == (
        getattr(v, "num_attention_heads", None) or v.num_heads)
    assert fields["clip.vision.patch_size"] == v.patch_size
    assert fields["clip.vision.image_mean"] == pytest.approx(pre["image_mean"])
    assert fields["clip.vision.image_std"] == pytest.approx(pre["image_std"])
    for i in range(layers):
        assert {f"v.blk.{i}.{t}" for t in BLOCK} <= set(tensors)
    assert PROJECTOR_TENSORS[name] <= set(tensors)
    _projector_keys(name, fields, cfg, pre)


def _projector_keys(name, fields, cfg, pre):
    """What clip.cpp reads per projector type, and the activation its graph uses."""
    v = cfg.vision_config
    if name == "gemma3":
        # the patch grid pooled to mm_tokens_per_image: 4x4 patches to 2x2 (default 4 unset)
        assert fields["clip.vision.projector.scale_factor"] == 2
        assert fields["clip.use_gelu"] is True
        assert fields["clip.vision.image_size"] == v.image_size
        assert fields["clip.vision.attention.layer_norm_epsilon"] == pytest.approx(
            v.layer_norm_eps)
    elif name == "qwen2_5_vl":
        # fullatt_block_indexes=[1]: every 2nd block attends to the whole image
        assert fields["clip.vision.n_wa_pattern"] == 2
        assert fields["clip.use_silu"] is True and "clip.use_gelu" not in fields
        # read by clip.cpp where present (default 2 and 112); the tiny model's window is 56
        assert fields["clip.vision.spatial_merge_size"] == v.spatial_merge_size == 2
        assert fields["clip.vision.window_size"] == v.window_size == 56
    else:
        assert fields["clip.vision.projector.scale_factor"] == cfg.scale_factor == 2
        assert fields["clip.use_gelu"] is True
        assert fields["clip.vision.image_size"] == v.image_size
        assert fields["clip.vision.preproc_image_size"] == pre["size"]["longest_edge"]


@pytest.mark.parametrize("name", WRITTEN)
def test_text_gguf_is_the_language_model(name, exported):
    _, merged, out, _ = exported(name)
    fields, tensors = _read(out)
    assert fields["general.architecture"] == TEXT_ARCH[name]
    assert not any(n.startswith(("v.", "mm.")) for n in tensors)
    if name == "qwen2_5_vl":  # M-RoPE sections, padded to llama.cpp's four
        assert fields["qwen2vl.rope.dimension_sections"] == [1, 1, 2, 0]
    lm = merged.model.language_model if hasattr(merged.model, "language_model") \
        else merged.model.text_model
    embed = _values(tensors["token_embd.weight"])
    torch.testing.assert_close(embed, lm.embed_tokens.weight.float(), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["gemma3", "idefics3", "smolvlm"])
def test_text_gguf_logits_through_our_loader(name, exported):
    """The text GGUF loaded by loratune's GGUF loader gives the merged VLM's logits on text
    (the dense families' tolerance, 1e-5)."""
    from loratune.models import load_model

    folder, merged, out, _ = exported(name)
    loaded, tok = load_model(str(out))
    ids = torch.tensor([tok("What colour is the square? Red.").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, merged(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(NOT_WRITTEN))
def test_other_vision_families_are_refused_with_the_reason(name, tmp_path):
    folder = getattr(vision_models, f"tiny_{name}")(tmp_path / name)
    with pytest.raises(GGUFExportError, match=f"model_type {name} is not supported") as e:
        write_vlm_gguf(folder, tmp_path / "o.gguf", "f32")
    assert NOT_WRITTEN[name] in str(e.value)
    assert main(["export", "gguf", "--model", str(folder), "--out",
                 str(tmp_path / "o.gguf")]) != 0
    assert not list(tmp_path.glob("*.gguf"))


def test_mmproj_path_taken_is_refused_before_writing(exported, tmp_path):
    folder, _, _, _ = exported("idefics3")
    (tmp_path / "mmproj-o.gguf").write_text("keep")
    assert main(["export", "gguf", "--model", str(folder), "--out",
                 str(tmp_path / "o.gguf")]) != 0
    assert (tmp_path / "mmproj-o.gguf").read_text() == "keep"
    assert not (tmp_path / "o.gguf").exists()


def test_qwen2vl_text_gguf_is_a_qwen2_file_with_the_merged_logits(exported, tmp_path):
    """Our loader reads no `qwen2vl` file (transformers' GGUF reader has no such architecture),
    so: the Qwen2.5-VL language model GGUF holds exactly the tensors of a `qwen2` GGUF of the
    same weights, and that file, read by our loader, gives the merged VLM's logits on text
    (where M-RoPE's three positions are equal, i.e. plain RoPE)."""
    from loratune.export.gguf_file import write_gguf
    from loratune.export.gguf_vision import text_folder
    from loratune.models import load_model

    folder, merged, out, _ = exported("qwen2_5_vl")
    merged.save_pretrained(tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    plain = text_folder(tmp_path / "merged", tmp_path / "work", config, "Qwen2ForCausalLM")
    qwen2 = write_gguf(plain, tmp_path / "qwen2.gguf", "f32", tokenizer_folder=folder)
    fields, tensors = _read(out)
    want_fields, want = _read(qwen2)
    assert want_fields["general.architecture"] == "qwen2"
    assert set(tensors) == set(want)
    for name, t in want.items():
        torch.testing.assert_close(_values(tensors[name]), _values(t), rtol=0, atol=0)
    for key in ("embedding_length", "block_count", "attention.head_count",
                "attention.head_count_kv", "rope.freq_base", "rope.dimension_count",
                "attention.layer_norm_rms_epsilon", "context_length"):
        assert fields[f"qwen2vl.{key}"] == want_fields[f"qwen2.{key}"], key
    loaded, tok = load_model(str(qwen2))
    ids = torch.tensor([tok("What colour is the square? Red.").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, merged(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)


def test_adapter_only_of_a_vlm_is_refused_with_why(exported, tmp_path, capsys):
    folder, _, _, _ = exported("idefics3")
    adapter = folder.parent / "adapter"
    assert main(["export", "gguf", "--model", str(folder), "--adapter", str(adapter),
                 "--adapter-only", "--out", str(tmp_path / "lora.gguf")]) != 0
    err = capsys.readouterr().err
    assert "--adapter-only of a vision-language model (idefics3)" in err
    assert "drop --adapter-only" in err
    assert not list(tmp_path.glob("*"))


def test_language_model_refused_leaves_no_mmproj(tmp_path, capsys):
    """Both files or neither: a Gemma 3 whose language model llama.cpp would compute
    differently (query_pre_attn_scalar) is refused after its mmproj was written; the mmproj
    goes too."""
    folder = vision_models.tiny_gemma3(tmp_path / "gemma3")
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["query_pre_attn_scalar"] = 7
    (folder / "config.json").write_text(json.dumps(config))
    assert main(["export", "gguf", "--model", str(folder), "--out",
                 str(tmp_path / "g.gguf")]) != 0
    assert "query_pre_attn_scalar=7" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.gguf"))


def test_quantized_export_keeps_the_mmproj_in_f16_with_f32_norms_and_embeddings(exported,
                                                                                 tmp_path):
    """--type q8_0: the language model quantized, the mmproj f16 matrices (as llama.cpp's
    converter writes it) with norms, biases and the patch / position embeddings in f32."""
    from gguf import GGMLQuantizationType as Q

    folder, merged, _, _ = exported("gemma3")
    out = tmp_path / "g.gguf"
    assert main(["export", "gguf", "--model", str(folder), "--out", str(out), "--type", "q8_0",
                 "--no-modelfile"]) == 0
    _, text = _read(out)
    assert text["blk.0.attn_q.weight"].tensor_type == Q.Q8_0
    fields, tensors = _read(tmp_path / "mmproj-g.gguf")
    assert fields["general.file_type"] == 1
    assert tensors["v.blk.0.attn_q.weight"].tensor_type == Q.F16
    for name in ("v.patch_embd.weight", "v.position_embd.weight", "v.blk.0.ln1.weight",
                 "v.blk.0.attn_q.bias", "mm.soft_emb_norm.weight"):
        assert tensors[name].tensor_type == Q.F32, name
