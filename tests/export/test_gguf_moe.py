"""GGUF export of mixture-of-experts bases (Qwen3-MoE as qwen3moe, Mixtral as llama with experts,
OLMoE as olmoe): experts stacked [experts, out, in] as llama.cpp reads them, the expert keys,
read back by our loader with the model's logits, expert LoRA adapters as llama.cpp's 3-D pairs
(applied as llama.cpp applies them, equal to the merge), and the refusals by name."""

import copy
import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from families import family_tokenizer  # noqa: E402
from loratune.adapters import add_adapter, save_adapter  # noqa: E402
from loratune.config import LoraConfig  # noqa: E402
from loratune.export.gguf_arch import GGUFExportError, rope_permute  # noqa: E402
from loratune.export.gguf_file import write_gguf, write_lora_gguf  # noqa: E402
from loratune.export.merge import merge_folder, read_adapters  # noqa: E402
from loratune.models import load_model  # noqa: E402
from loratune.models.gguf_config import GGUFLoadError  # noqa: E402
from tests.adapters.test_expert_lora import randomize  # noqa: E402
from tests.models.test_moe_families import IDS, moe_config  # noqa: E402

ARCH = {"qwen3_moe": "qwen3moe", "mixtral": "llama", "olmoe": "olmoe"}
FAMILIES = list(ARCH)
BLOCK = {  # llama.cpp's tensors of one block (its llama-arch.cpp / load_arch_tensors lists)
    "qwen3moe": {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm",
                 "attn_k_norm", "ffn_norm", "ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps",
                 "ffn_down_exps"},
    "llama": {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm",
              "ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"},
    "olmoe": {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm",
              "attn_k_norm", "ffn_norm", "ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps",
              "ffn_down_exps"},
}


def build(name: str, seed: int = 0, **fields):
    from transformers import AutoModelForCausalLM

    tok = family_tokenizer("qwen3")
    cfg = moe_config(name, tok)
    if name == "olmoe":  # llama.cpp's olmoe: attn_k_norm is n_embd wide, no grouped-query
        cfg.num_key_value_heads = cfg.num_attention_heads
    for k, v in fields.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # some routers start at zero: give every expert tokens
        for n, p in model.named_parameters():
            if p.abs().max() == 0 and "bias" not in n:
                p.normal_(0, 0.5)
    return model.eval(), tok


def save(name: str, folder, **fields):
    model, tok = build(name, **fields)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model


def read(path):
    reader = gguf.GGUFReader(str(path))
    return ({k: f.contents() for k, f in reader.fields.items()},
            {t.name: t for t in reader.tensors})


def values(t) -> torch.Tensor:
    x = np.asarray(gguf.dequantize(t.data, t.tensor_type), dtype=np.float32)
    return torch.from_numpy(x.reshape(list(reversed(t.shape.tolist()))).copy())


def logits(model):
    with torch.no_grad():
        return model(IDS).logits.float()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root, cache = tmp_path_factory.mktemp("moe"), {}

    def get(name):
        if name not in cache:
            model = save(name, root / name)
            cache[name] = model, write_gguf(root / name, root / f"{name}.gguf", "f32")
        return cache[name]
    return get


@pytest.mark.parametrize("name", FAMILIES)
def test_experts_stacked_as_llamacpp_reads_them(name, exported):
    model, path = exported(name)
    fields, tensors = read(path)
    arch, cfg = ARCH[name], model.config
    assert fields["general.architecture"] == arch
    assert set(tensors) == {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(2) for n in BLOCK[arch]}
    experts = model.model.layers[1].mlp.experts
    gate, up = experts.gate_up_proj.detach().chunk(2, dim=1)
    inter = gate.shape[1]
    # ggml's ne is numpy's shape reversed: [in, out, experts]
    assert tensors["blk.1.ffn_gate_exps.weight"].shape.tolist() == [32, inter, 4]
    torch.testing.assert_close(values(tensors["blk.1.ffn_gate_exps.weight"]), gate)
    torch.testing.assert_close(values(tensors["blk.1.ffn_up_exps.weight"]), up)
    torch.testing.assert_close(values(tensors["blk.1.ffn_down_exps.weight"]),
                               experts.down_proj.detach())
    torch.testing.assert_close(values(tensors["blk.1.ffn_gate_inp.weight"]),
                               model.model.layers[1].mlp.gate.weight.detach())
    q = model.model.layers[1].self_attn.q_proj.weight.detach()
    want_q = rope_permute(q, cfg.num_attention_heads) if arch == "llama" else q
    torch.testing.assert_close(values(tensors["blk.1.attn_q.weight"]), want_q)
    assert fields[f"{arch}.expert_count"] == 4
    assert fields[f"{arch}.expert_used_count"] == 2
    assert fields[f"{arch}.expert_feed_forward_length"] == inter


def test_fused_checkpoint_gives_the_same_file(exported, tmp_path):
    """A checkpoint holding the experts fused ([E, 2I, H], as the model does) is split into
    the same ffn_gate_exps / ffn_up_exps as one storing a matrix per expert."""
    from safetensors.torch import save_file

    model, path = exported("qwen3_moe")
    folder = tmp_path / "fused"
    family_tokenizer("qwen3").save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              folder / "model.safetensors")
    (folder / "config.json").write_text((path.parent / "qwen3_moe" / "config.json").read_text())
    _, want = read(path)
    _, got = read(write_gguf(folder, tmp_path / "f.gguf", "f32"))
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(values(got[n]), values(want[n]), atol=0, rtol=0, msg=n)


@pytest.mark.parametrize("kind", ["f32", "f16"])
@pytest.mark.parametrize("name", FAMILIES)
def test_read_back_by_our_loader_with_the_models_logits(name, kind, exported, tmp_path):
    model, _ = exported(name)
    folder = tmp_path / "m"
    model.save_pretrained(folder)
    family_tokenizer("qwen3").save_pretrained(folder)
    path = write_gguf(folder, tmp_path / f"m.{kind}.gguf", kind)
    if kind == "f16":  # matrices stored in half precision, norms in f32: the same rounding here
        model = copy.deepcopy(model)  # the module fixture's model stays as exported
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.copy_(p.half().float())
    loaded, tok = load_model(str(path))
    assert type(loaded).__name__ == type(model).__name__
    assert tok("apple river").input_ids == family_tokenizer("qwen3")("apple river").input_ids
    torch.testing.assert_close(logits(loaded), logits(model), atol=1e-4, rtol=0)


def test_quantized_experts_keep_their_stacked_shape(exported, tmp_path):
    model, _ = exported("qwen3_moe")
    model.save_pretrained(tmp_path / "m")
    family_tokenizer("qwen3").save_pretrained(tmp_path / "m")
    _, tensors = read(write_gguf(tmp_path / "m", tmp_path / "q.gguf", "q8_0"))
    t = tensors["blk.0.ffn_gate_exps.weight"]  # rows of 32: one Q8_0 block each
    assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0 and t.shape.tolist() == [32, 16, 4]
    gate = model.model.layers[0].mlp.experts.gate_up_proj.detach()[:, :16]
    torch.testing.assert_close(values(t), gate, atol=0.02, rtol=0)
    loaded, _ = load_model(str(tmp_path / "q.gguf"))
    assert (logits(loaded) - logits(model)).abs().max() < 0.05


def adapted(name, tmp_path):
    """(adapted model, base folder, adapter folder): LoRA on q_proj and on the routed experts."""
    base = save(name, tmp_path / "base")
    model, _ = build(name)
    add_adapter(model, LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj", "experts"]))
    randomize(model)
    save_adapter(model, tmp_path / "a")
    assert (logits(model) - logits(base)).abs().max() > 1e-2
    return model, tmp_path / "base", tmp_path / "a"


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_merged_expert_adapter_gguf_reads_back_with_the_adapted_logits(name, tmp_path):
    model, base, adapter = adapted(name, tmp_path)
    merged = merge_folder(base, read_adapters([adapter], None), tmp_path / "merged").out
    loaded, _ = load_model(str(write_gguf(merged, tmp_path / "m.gguf", "f32")))
    torch.testing.assert_close(logits(loaded), logits(model), atol=1e-4, rtol=0)


def _apply_as_llamacpp(base: dict, lora: dict, alpha: float) -> dict[str, torch.Tensor]:
    """llama.cpp's arithmetic (build_lora_mm / build_lora_mm_id): W + alpha / rank · B·A per
    tensor, rank = B's ne[0]; 3-D pairs per expert."""
    out = {n: values(t) for n, t in base.items()}
    for name in {n.rsplit(".lora_", 1)[0] for n in lora}:
        a, b = values(lora[f"{name}.lora_a"]), values(lora[f"{name}.lora_b"])
        out[name] = out[name] + alpha / b.shape[-1] * (b @ a)
    return out


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_expert_lora_gguf_applied_as_llamacpp_does_equals_the_merge(name, tmp_path):
    _, base, adapter = adapted(name, tmp_path)
    fields, lora = read(write_lora_gguf(adapter, base, tmp_path / "a.gguf"))
    assert fields["general.type"] == "adapter" and fields["general.architecture"] == ARCH[name]
    for part in ("gate", "up", "down"):
        a = lora[f"blk.1.ffn_{part}_exps.weight.lora_a"].shape.tolist()
        b = lora[f"blk.1.ffn_{part}_exps.weight.lora_b"].shape.tolist()
        assert a[1:] == [2, 4] and b[0] == 2 and b[2] == 4  # [in, r, E], [r, out, E]
    merged = merge_folder(base, read_adapters([adapter], None), tmp_path / "merged").out
    _, want = read(write_gguf(merged, tmp_path / "m.gguf", "f32"))
    _, plain = read(write_gguf(base, tmp_path / "b.gguf", "f32"))
    got = _apply_as_llamacpp(plain, lora, fields["adapter.lora.alpha"])
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], values(want[n]), atol=1e-5, rtol=0, msg=n)
    assert not torch.equal(got["blk.1.ffn_down_exps.weight"],
                           values(plain["blk.1.ffn_down_exps.weight"]))


@pytest.mark.parametrize("name,fields,why", [
    ("olmoe", {"num_key_value_heads": 2}, "num_key_value_heads=2; llama.cpp's olmoe sizes "
                                          "attn_k_norm as n_embd"),
    ("olmoe", {"norm_topk_prob": True}, "norm_topk_prob=true; llama.cpp's olmoe does not "
                                        "renormalize"),
    ("qwen3_moe", {"norm_topk_prob": False}, "norm_topk_prob=false; llama.cpp's qwen3moe "
                                             "renormalizes"),
    ("qwen3_moe", {"mlp_only_layers": [1]}, r"mlp_only_layers=\[1\].*every layer sparse"),
    ("mixtral", {"sliding_window": 8}, "sliding_window=8; llama.cpp's llama has no sliding"),
])
def test_settings_llamacpp_computes_differently_are_refused(name, fields, why, tmp_path):
    save(name, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, **fields}))
    with pytest.raises(GGUFExportError, match=why):
        write_gguf(tmp_path / "m", tmp_path / "m.gguf", "f32")


def test_reader_refuses_a_file_missing_a_tensor(exported, tmp_path):
    from loratune.models.gguf_moe import read_moe_gguf

    _, path = exported("olmoe")
    fields, tensors = read(path)
    writer = gguf.GGUFWriter(str(tmp_path / "cut.gguf"), "olmoe")
    for key in ("block_count", "embedding_length", "feed_forward_length", "context_length",
                "attention.head_count", "attention.head_count_kv", "expert_count",
                "expert_used_count", "vocab_size"):
        writer.add_uint32(f"olmoe.{key}", fields[f"olmoe.{key}"])
    writer.add_float32("olmoe.attention.layer_norm_rms_epsilon", 1e-6)
    for n, t in tensors.items():
        if n != "blk.1.ffn_up_exps.weight":
            writer.add_tensor(n, values(t).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFLoadError, match=r"no tensor for model.layers.1.mlp.experts.up_proj"
                                            r".weight \(expected blk.1.ffn_up_exps.weight\)"):
        read_moe_gguf(tmp_path / "cut.gguf", torch.float32)


@pytest.mark.parametrize("name", ["mixtral", "olmoe"])
def test_moe_gguf_converted_to_a_folder_keeps_the_logits(name, exported, tmp_path):
    """A MoE .gguf as --model of merge / export: converted once to a safetensors folder through
    the same reader (transformers' would give Mixtral random MLPs and refuse OLMoE)."""
    from transformers import AutoModelForCausalLM

    from loratune.models.load import convert_gguf_to_folder

    model, path = exported(name)
    convert_gguf_to_folder(path, tmp_path / "folder")
    folder = AutoModelForCausalLM.from_pretrained(tmp_path / "folder", dtype=torch.float32)
    torch.testing.assert_close(logits(folder.eval()), logits(model), atol=1e-4, rtol=0)
    _, tok = load_model(str(tmp_path / "folder"))
    assert tok("apple river").input_ids == family_tokenizer("qwen3")("apple river").input_ids


@pytest.mark.parametrize("kind", ["q4_k", "q6_k", "q8_0", "q4_0"])
def test_stacked_experts_quantize_as_each_expert_alone(kind):
    """[E, out, in] quantized row by row: each expert's bytes are its own 2-D encoding, under
    the experts' leading dim (the shape gguf's writer reads the tensor's ne from)."""
    from loratune.export.gguf_file import _encode

    t = torch.randn(3, 4, 256, generator=torch.Generator().manual_seed(0))
    array, raw = _encode(t, kind)
    assert array.shape[:2] == (3, 4)
    for e in range(3):
        alone, raw_e = _encode(t[e], kind)
        assert raw_e == raw and np.array_equal(array[e], alone)
    back = gguf.dequantize(array, raw)
    assert back.shape == (3, 4, 256)
    torch.testing.assert_close(torch.from_numpy(back.copy()), t, atol=0.3, rtol=0)
