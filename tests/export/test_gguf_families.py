"""GGUF export of every family (tests/families.py) read back with gguf.GGUFReader: names, shapes,
values, architecture metadata, tokenizer; logits through our own GGUF loader (equal to the
folder's)."""

import json
import math

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from families import FAMILIES, FAMILY_SPECS, build_family, save_family  # noqa: E402
from loratune.adapters import add_adapter, save_adapter  # noqa: E402
from loratune.config import LoraConfig  # noqa: E402
from loratune.export.gguf_arch import GGUFExportError, rope_permute  # noqa: E402
from loratune.export.gguf_file import write_gguf, write_lora_gguf  # noqa: E402
from tiny import randomize_lora  # noqa: E402

ARCH = {"llama3_1": "llama", "llama3_2": "llama", "qwen2_5": "qwen2", "qwen3": "qwen3",
        "mistral_v0_3": "llama", "gemma2": "gemma2", "gemma3": "gemma3", "phi3": "phi3",
        "phi3_5": "phi3", "phi4_mini": "phi3"}
BLOCK = {  # llama.cpp's tensors of one block, per architecture (its llama-arch.cpp lists)
    "llama": {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate",
              "ffn_up", "ffn_down"},
    "qwen2": {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate",
              "ffn_up", "ffn_down", "attn_q.bias", "attn_k.bias", "attn_v.bias"},
    "qwen3": {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm",
              "attn_k_norm", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"},
    "gemma2": {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "post_attention_norm",
               "ffn_norm", "ffn_gate", "ffn_up", "ffn_down", "post_ffw_norm"},
    "gemma3": {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm",
               "attn_k_norm", "post_attention_norm", "ffn_norm", "ffn_gate", "ffn_up",
               "ffn_down", "post_ffw_norm"},
    "phi3": {"attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down"},
}
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    cache = {}

    def get(name):
        if name not in cache:
            folder = save_family(name, root / name)
            cache[name] = folder, write_gguf(folder, root / f"{name}.gguf", "f32")
        return cache[name]
    return get


def read(path):
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    return fields, {t.name: t for t in reader.tensors}


def values(t) -> torch.Tensor:
    shape = list(reversed(t.shape.tolist()))
    return torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(shape))


def llama3_factors(rope: dict, head_dim: int) -> list[float]:
    """Meta's Llama 3.1 frequency scaling, written out: the divisor of each default frequency."""
    out = []
    low = rope["original_max_position_embeddings"] / rope["low_freq_factor"]
    high = rope["original_max_position_embeddings"] / rope["high_freq_factor"]
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * rope["rope_theta"] ** (i / head_dim)
        if wavelen < high:
            out.append(1.0)
        elif wavelen > low:
            out.append(rope["factor"])
        else:
            s = (rope["original_max_position_embeddings"] / wavelen - rope["low_freq_factor"]) / (
                rope["high_freq_factor"] - rope["low_freq_factor"])
            out.append(1 / ((1 - s) / rope["factor"] + s))
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_family_gguf_names_shapes_values(name, exported):
    folder, path = exported(name)
    fields, tensors = read(path)
    arch = ARCH[name]
    fam = FAMILY_SPECS[name]
    config = json.loads((folder / "config.json").read_text())
    assert fields["general.architecture"] == arch
    block = {n if "." in n else f"{n}.weight" for n in BLOCK[arch]}
    expected = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{n}" for i in range(2) for n in block}
    if not fam.tie:
        expected.add("output.weight")
    extra = {n for n in tensors if n.startswith("rope_")}
    assert set(tensors) - extra == expected
    model, _ = build_family(name)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    torch.testing.assert_close(values(tensors["token_embd.weight"]),
                               state["model.embed_tokens.weight"])
    if arch == "llama":  # interleaved RoPE: Q and K rows permuted per head
        torch.testing.assert_close(values(tensors["blk.1.attn_q.weight"]), rope_permute(
            state["model.layers.1.self_attn.q_proj.weight"], config["num_attention_heads"]))
        torch.testing.assert_close(values(tensors["blk.1.attn_k.weight"]), rope_permute(
            state["model.layers.1.self_attn.k_proj.weight"], config["num_key_value_heads"]))
    elif arch == "phi3":  # fused layers as they are
        torch.testing.assert_close(values(tensors["blk.1.attn_qkv.weight"]),
                                   state["model.layers.1.self_attn.qkv_proj.weight"])
        torch.testing.assert_close(values(tensors["blk.1.ffn_up.weight"]),
                                   state["model.layers.1.mlp.gate_up_proj.weight"])
    else:  # rotate-half RoPE: as stored
        torch.testing.assert_close(values(tensors["blk.1.attn_q.weight"]),
                                   state["model.layers.1.self_attn.q_proj.weight"])
    if arch.startswith("gemma"):  # RMSNorm scales by 1 + w; llama.cpp by the stored value
        torch.testing.assert_close(values(tensors["blk.0.post_ffw_norm.weight"]),
                                   state["model.layers.0.post_feedforward_layernorm.weight"] + 1)
        torch.testing.assert_close(values(tensors["output_norm.weight"]),
                                   state["model.norm.weight"] + 1)
    else:
        torch.testing.assert_close(values(tensors["output_norm.weight"]), state["model.norm.weight"])
    if arch == "qwen2":
        torch.testing.assert_close(values(tensors["blk.0.attn_k.bias"]),
                                   state["model.layers.0.self_attn.k_proj.bias"])


@pytest.mark.parametrize("name", FAMILIES)
def test_family_gguf_metadata(name, exported):
    folder, path = exported(name)
    fields, tensors = read(path)
    arch = ARCH[name]
    model, _ = build_family(name)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert fields[f"{arch}.block_count"] == 2 and fields[f"{arch}.embedding_length"] == 32
    assert fields[f"{arch}.attention.head_count"] == 4
    assert fields[f"{arch}.attention.head_count_kv"] == 2
    assert fields[f"{arch}.attention.key_length"] == head_dim  # Qwen3, Gemma: 16, not 32/4
    assert fields[f"{arch}.attention.value_length"] == head_dim
    rope = dict(cfg.rope_parameters)
    rope = rope.get("full_attention", rope)
    assert fields[f"{arch}.rope.freq_base"] == pytest.approx(rope["rope_theta"])
    rotary = int(head_dim * rope.get("partial_rotary_factor", 1.0))
    assert fields[f"{arch}.rope.dimension_count"] == rotary  # Phi-4-mini: 0.75 of the head
    if rope.get("rope_type") == "llama3":
        got = values(tensors["rope_freqs.weight"]).tolist()
        assert got == pytest.approx(llama3_factors(rope, head_dim), rel=1e-5)
        assert len(set(np.round(got, 4))) > 1  # scaled and unscaled frequencies both occur
    if rope.get("rope_type") == "longrope":
        assert values(tensors["rope_factors_long.weight"]).tolist() == pytest.approx(
            rope["long_factor"])
        assert values(tensors["rope_factors_short.weight"]).tolist() == pytest.approx(
            rope["short_factor"])
        scale = cfg.max_position_embeddings / cfg.original_max_position_embeddings
        assert fields[f"{arch}.rope.scaling.attn_factor"] == pytest.approx(
            math.sqrt(1 + math.log(scale) / math.log(cfg.original_max_position_embeddings)))
    if arch == "phi3":
        assert fields[f"{arch}.rope.scaling.original_context_length"] == getattr(
            cfg, "original_max_position_embeddings", None) or cfg.max_position_embeddings
    if arch == "gemma2":
        assert fields["gemma2.attn_logit_softcapping"] == pytest.approx(50.0)
        assert fields["gemma2.final_logit_softcapping"] == pytest.approx(30.0)
    if arch.startswith("gemma"):
        assert fields[f"{arch}.attention.sliding_window"] == 16
        assert fields[f"{arch}.attention.sliding_window_pattern"] == [
            t == "sliding_attention" for t in cfg.layer_types]


def _spm_tokenize(text: str, pieces: dict[str, tuple[int, float]], prefix: bool) -> list[int]:
    """llama.cpp's SentencePiece merging, written out: start from characters, repeatedly join
    the adjacent pair whose joined piece has the highest score (leftmost on ties); characters
    not in the vocabulary become <0xXX> byte pieces."""
    text = ("▁" if prefix else "") + text.replace(" ", "▁")
    symbols = list(text)
    while True:
        best = None
        for i in range(len(symbols) - 1):
            joined = symbols[i] + symbols[i + 1]
            if joined in pieces and (best is None or pieces[joined][1] > best[1]):
                best = (i, pieces[joined][1])
        if best is None:
            break
        i = best[0]
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    ids = []
    for s in symbols:
        if s in pieces:
            ids.append(pieces[s][0])
        else:
            ids += [pieces[f"<0x{b:02X}>"][0] for b in s.encode()]
    return ids


@pytest.mark.parametrize("name", FAMILIES)
def test_family_gguf_tokenizer(name, exported):
    folder, path = exported(name)
    fields, _ = read(path)
    fam = FAMILY_SPECS[name]
    _, tok = build_family(name)
    tokens = fields["tokenizer.ggml.tokens"]
    types = fields["tokenizer.ggml.token_type"]
    assert len(tokens) == json.loads((folder / "config.json").read_text())["vocab_size"]
    assert fields["tokenizer.ggml.model"] == ("gpt2" if fam.kind == "bpe" else "llama")
    for special in fam.specials:
        assert types[tok.convert_tokens_to_ids(special)] == gguf.TokenType.CONTROL, special
    for added in fam.added:
        assert types[tok.convert_tokens_to_ids(added)] == gguf.TokenType.USER_DEFINED, added
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert fields["tokenizer.ggml.add_bos_token"] == fam.add_bos
    assert fields["tokenizer.chat_template"] == fam.template
    gen_eos = [tok.convert_tokens_to_ids(t) for t in fam.generation_eos]
    others = [i for i in gen_eos if i != tok.eos_token_id]
    assert fields.get("tokenizer.ggml.eot_token_id") == (others[0] if others else None)
    texts = ["What is the capital of France?", "apple apple  apple, river stone 42 1234",
             "Größe ünd naïve ✅ 你好"]
    if fam.kind == "bpe":
        want = {"llama": "llama-bpe", "qwen2": "qwen2", "qwen3": "qwen2", "phi3": "gpt-4o"}
        assert fields["tokenizer.ggml.pre"] == want[fam.model_type]  # detected, not given
        assert fields["tokenizer.ggml.merges"][:5] == [
            " ".join(m) if isinstance(m, list) else m
            for m in json.loads((folder / "tokenizer.json").read_text())["model"]["merges"][:5]]
        assert tokens[0] == fam.specials[0]
    else:
        assert fields["tokenizer.ggml.pre"] == "default"
        assert all(types[tok.convert_tokens_to_ids(f"<0x{b:02X}>")] == gguf.TokenType.BYTE
                   for b in range(256))
        prefix = fields["tokenizer.ggml.add_space_prefix"]
        assert prefix == (fam.spm_style != "gemma")
        scores = fields["tokenizer.ggml.scores"]
        pieces = {t: (i, s) for i, (t, s, ty) in enumerate(zip(tokens, scores, types))
                  if ty in (gguf.TokenType.NORMAL, gguf.TokenType.BYTE)}
        for text in texts:  # the scores reproduce the tokenizer's merges
            assert _spm_tokenize(text, pieces, prefix) == tok(text, add_special_tokens=False
                                                              ).input_ids, text


@pytest.mark.parametrize("name", FAMILIES)
def test_family_gguf_read_back_by_our_loader(name, exported):
    """Every family's f32 GGUF loads with the folder's logits (1e-5): the settings
    transformers' GGUF reader drops are put back from the metadata (models/gguf_config.py;
    the refusals are in tests/models/test_gguf_config.py)."""
    from loratune.models import load_model

    _, path = exported(name)
    model, tok = build_family(name)
    text = "What is the capital of France? Paris."
    ids = torch.tensor([tok(text).input_ids])
    # past original_max_position_embeddings (64): Phi-3.5/4-mini switch to the long factors
    long_ids = torch.tensor([tok(" ".join(["apple river stone"] * 40)).input_ids])
    assert long_ids.shape[1] > 64
    loaded, loaded_tok = load_model(str(path))
    assert loaded_tok(text).input_ids == ids[0].tolist()
    with torch.no_grad():
        for x in (ids, long_ids):
            torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_family_lora_gguf(name, tmp_path):
    folder = save_family(name, tmp_path / name)
    model, _ = build_family(name)
    fam = FAMILY_SPECS[name]
    targets = ["qkv_proj", "o_proj"] if fam.fused else ["q_proj", "k_proj", "o_proj"]
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    randomize_lora(model)
    save_adapter(model, tmp_path / "ad")
    fields, tensors = read(write_lora_gguf(tmp_path / "ad", folder, tmp_path / "ad.gguf"))
    assert fields["general.architecture"] == ARCH[name]  # llama.cpp refuses another arch
    assert fields["general.type"] == "adapter" and fields["adapter.lora.alpha"] == 8.0
    parts = ["attn_qkv", "attn_output"] if fam.fused else ["attn_q", "attn_k", "attn_output"]
    assert set(tensors) == {f"blk.{i}.{p}.weight.lora_{ab}" for i in range(2) for p in parts
                            for ab in "ab"}
    attn = model.model.layers[1].self_attn
    if fam.fused:
        ref = attn.qkv_proj.adapters["default"].lora_B.detach()
        torch.testing.assert_close(values(tensors["blk.1.attn_qkv.weight.lora_b"]), ref)
    else:
        ref = attn.k_proj.adapters["default"].lora_B.detach()
        want = rope_permute(ref, 2) if ARCH[name] == "llama" else ref
        torch.testing.assert_close(values(tensors["blk.1.attn_k.weight.lora_b"]), want)


def test_unsupported_settings_are_refused_by_name(tmp_path):
    folder = save_family("gemma2", tmp_path / "g")
    config = json.loads((folder / "config.json").read_text())
    config["query_pre_attn_scalar"] = 256
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(GGUFExportError, match="query_pre_attn_scalar=256"):
        write_gguf(folder, tmp_path / "g.gguf", "f32")
    folder = save_family("qwen2_5", tmp_path / "q")
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(GGUFExportError, match="rope scaling 'dynamic'"):
        write_gguf(folder, tmp_path / "q.gguf", "f32")
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["model"]["type"] = "Unigram"
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="tokenizer model 'Unigram'"):
        write_gguf(folder, tmp_path / "q.gguf", "f32")
