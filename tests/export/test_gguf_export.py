"""GGUF export read back with gguf.GGUFReader: metadata, names, shapes, values, tokenizer."""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from loratune.adapters import add_adapter, save_adapter  # noqa: E402
from loratune.cli import main  # noqa: E402
from loratune.config import IA3Config, LoraConfig  # noqa: E402
from loratune.export.gguf_file import GGUFExportError, rope_permute, write_gguf  # noqa: E402
from loratune.export.kquants import quantize_q4_k, quantize_q6_k  # noqa: E402
from loratune.models.load import embedded_folder  # noqa: E402
from tiny import randomize_lora, tiny_llama  # noqa: E402

Q = gguf.GGMLQuantizationType


@pytest.fixture
def tiny_dir(tmp_path, smol_tokenizer):
    model = tiny_llama(vocab=len(smol_tokenizer))
    model.config.rope_parameters = {"rope_type": "default", "rope_theta": 12345.0}
    model.save_pretrained(tmp_path / "tiny")
    smol_tokenizer.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny", model


def read(path):
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items()
              if not k.startswith("tokenizer.ggml.")}
    tensors = {t.name: t for t in reader.tensors}
    return reader, fields, tensors


def values(t):
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(list(reversed(t.shape.tolist())))


def test_rope_permute_interleaves_each_heads_halves():
    w = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(16, 3)  # 2 heads of 8 rows
    p = rope_permute(w, 2)
    for h in range(2):
        for i in range(4):
            assert torch.equal(p[h * 8 + 2 * i], w[h * 8 + i])
            assert torch.equal(p[h * 8 + 2 * i + 1], w[h * 8 + 4 + i])


@pytest.mark.parametrize("kind,tol", [("f32", 0), ("f16", 1e-3), ("q8_0", 0.02), ("q4_0", 0.2),
                                      ("q4_k_m", 0.2)])
def test_model_gguf_reads_back(tiny_dir, tmp_path, kind, tol):
    folder, model = tiny_dir
    out = write_gguf(folder, tmp_path / f"m-{kind}.gguf", kind, tokenizer_pre="smollm")
    reader, fields, tensors = read(out)
    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == 2 and fields["llama.embedding_length"] == 32
    assert fields["llama.attention.head_count"] == 4 and fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.rope.dimension_count"] == 8
    theta = model.config.to_dict().get("rope_parameters", {}).get("rope_theta", 10000.0)
    assert fields["llama.rope.freq_base"] == pytest.approx(theta)
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(2) for n in
        ["attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
         "ffn_up", "ffn_down"]}
    assert set(tensors) == expected
    state = model.state_dict()
    checks = {"blk.0.attn_q.weight": rope_permute(state["model.layers.0.self_attn.q_proj.weight"], 4),
              "blk.1.attn_k.weight": rope_permute(state["model.layers.1.self_attn.k_proj.weight"], 2),
              "blk.0.ffn_down.weight": state["model.layers.0.mlp.down_proj.weight"],
              "blk.0.attn_norm.weight": state["model.layers.0.input_layernorm.weight"]}
    for name, ref in checks.items():
        got = torch.from_numpy(np.ascontiguousarray(values(tensors[name])).astype(np.float32))
        assert got.shape == ref.shape, name
        rel = float((got - ref).abs().mean() / ref.abs().mean())
        assert rel <= tol + 1e-7, (name, rel)
    if kind == "q8_0":
        assert tensors["blk.0.attn_q.weight"].tensor_type == Q.Q8_0
    assert tensors["blk.0.attn_norm.weight"].tensor_type == Q.F32


def test_kquant_blocks_decode_with_ggufs_reader():
    x = np.random.default_rng(0).standard_normal((6, 512)).astype(np.float32)
    for quantize, qtype, tol in [(quantize_q4_k, Q.Q4_K, 0.10), (quantize_q6_k, Q.Q6_K, 0.025)]:
        blocks = quantize(x)
        assert blocks.shape[1] == 512 // 256 * gguf.GGML_QUANT_SIZES[qtype][1]
        back = gguf.quants.dequantize(blocks, qtype)
        assert np.abs(back - x).mean() / np.abs(x).mean() < tol
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_q4_k(x[:, :100])


def test_tokenizer_built_from_json_equals_the_source_ggufs(tmp_path):
    folder = embedded_folder("smollm2-135m-instruct")
    ours = write_gguf(folder, tmp_path / "a.gguf", "q4_0", tokenizer_pre="smollm")
    copied = write_gguf(folder, tmp_path / "b.gguf", "q4_0")  # tokenizer copied from the source
    a, b = gguf.GGUFReader(str(ours)), gguf.GGUFReader(str(copied))
    for key in ["tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.chat_template"]:
        assert a.fields[key].contents() == b.fields[key].contents(), key


def test_adapter_only_and_bad_input(tiny_dir, tmp_path, capsys):
    folder, model = tiny_dir
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_lora(model)
    save_adapter(model, tmp_path / "ad")
    assert main(["export", "gguf", "--model", str(folder), "--adapter", str(tmp_path / "ad"),
                 "--adapter-only", "--out", str(tmp_path / "ad.gguf")]) == 0
    reader, fields, tensors = read(tmp_path / "ad.gguf")
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 8.0
    assert set(tensors) == {f"blk.{i}.attn_{p}.weight.lora_{ab}" for i in range(2)
                            for p in "qv" for ab in "ab"}
    b = torch.from_numpy(values(tensors["blk.0.attn_q.weight.lora_b"]).copy())
    ref = model.model.layers[0].self_attn.q_proj.adapters["default"].lora_B.detach()
    torch.testing.assert_close(b.float(), rope_permute(ref, 4), atol=1e-3, rtol=1e-3)  # f16
    # IA³ cannot go to llama.cpp as an adapter; unknown architectures are named
    m2 = tiny_llama(vocab=64)
    add_adapter(m2, IA3Config())
    save_adapter(m2, tmp_path / "ia3")
    assert main(["export", "gguf", "--model", str(folder), "--adapter", str(tmp_path / "ia3"),
                 "--adapter-only", "--out", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err   # the reason is the record's: ia3 holds no LoRA factors
    assert "ia3 adapter cannot be" in err and "merge it instead" in err
    cfg = (folder / "config.json").read_text().replace("LlamaForCausalLM", "GPT2LMHeadModel")
    (folder / "config.json").write_text(cfg)
    with pytest.raises(GGUFExportError, match="GPT2LMHeadModel is not supported.*LlamaForCausalLM"):
        write_gguf(folder, tmp_path / "y.gguf", "f16", tokenizer_pre="smollm")


def test_tied_embeddings_are_written_once_as_token_embd(tmp_path, smol_tokenizer):
    from safetensors.torch import save_file

    model = tiny_llama(vocab=len(smol_tokenizer), tie=True)
    folder = tmp_path / "tied"
    model.save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    # as safetensors.save_model writes a tied model: the shared matrix under lm_head only
    state = {k: v for k, v in model.state_dict().items() if k != "model.embed_tokens.weight"}
    for f in folder.glob("*.safetensors"):
        f.unlink()
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    out = write_gguf(folder, tmp_path / "t.gguf", "f32", tokenizer_pre="smollm")
    _, _, tensors = read(out)
    assert "token_embd.weight" in tensors and "output.weight" not in tensors
    got = torch.from_numpy(values(tensors["token_embd.weight"]).copy())
    torch.testing.assert_close(got, model.model.embed_tokens.weight.detach())


def _best_scale_q6_k_error(x: np.ndarray, candidates: int = 400) -> float:
    """Relative RMSE of Q6_K's value grid with, per group of 16, the best of `candidates`
    float scales (−32…31 levels): an independent near-optimum for the format."""
    g = x.reshape(-1, 16).astype(np.float64)
    peak = np.abs(g).max(-1)
    best = np.full(len(g), np.inf)
    for scale in np.linspace(peak / 40, peak / 28, candidates):
        q = np.clip(np.rint(g / scale[:, None]), -32, 31)
        best = np.minimum(best, ((g - scale[:, None] * q) ** 2).sum(-1))
    return float(np.sqrt(best.sum() / (g ** 2).sum()))


def _best_q4_k_error(x: np.ndarray) -> float:
    """Relative RMSE of Q4_K's value grid (0…15 levels, offset ≤ 0) with, per group of 32, the
    best of a 120 × 41 grid of float steps and offsets: an independent near-optimum."""
    g = x.reshape(-1, 32).astype(np.float64)
    lo = np.minimum(g.min(-1), 0.0)
    span = g.max(-1) - lo
    best = np.full(len(g), np.inf)
    for f_step in np.linspace(0.7, 1.2, 120):
        step = span / 15 * f_step
        for f_off in np.linspace(-0.5, 0.5, 41):
            off = np.minimum(lo + f_off * step, 0.0)
            q = np.clip(np.rint((g - off[:, None]) / step[:, None]), 0, 15)
            best = np.minimum(best, ((g - step[:, None] * q - off[:, None]) ** 2).sum(-1))
    return float(np.sqrt(best.sum() / (g ** 2).sum()))


def _rel_rmse(back: np.ndarray, x: np.ndarray) -> float:
    return float(np.sqrt(((back - x) ** 2).sum() / (x ** 2).sum()))


def test_k_quant_errors_are_near_the_formats_best():
    # Fitted scales (and mins) reach 1.05× of these plain-RMSE optima on Gaussian rows: the fit
    # weights large values more (what lowered llama.cpp's KL, benchmarks/README.md) and the 6-bit
    # sub-block scales cost a little. Range-only scales were 1.12× (Q6_K) and 1.15× (Q4_K).
    x = np.random.default_rng(0).standard_normal((6, 512)).astype(np.float32)
    q6 = _rel_rmse(gguf.quants.dequantize(quantize_q6_k(x), Q.Q6_K), x)
    reference = _best_scale_q6_k_error(x)
    assert 0.0155 < reference < 0.0175, reference
    assert q6 <= 1.07 * reference, (q6, reference)
    q4 = _rel_rmse(gguf.quants.dequantize(quantize_q4_k(x), Q.Q4_K), x)
    reference = _best_q4_k_error(x)
    assert 0.06 < reference < 0.075, reference
    assert q4 <= 1.08 * reference, (q4, reference)


def test_mix_matches_llamacpps_own_quantizer():
    from loratune.export.gguf_file import tensor_kind

    # Observed in llama.cpp's Q4_K_M of SmolLM2-135M (30 layers, llama_model_quantize): the
    # attn_v / ffn_down layers that get 6 bits (Q6_K, or its Q8_0 fallback for 576-wide rows).
    six_bit = {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29}
    for i in range(30):
        for part in ("attn_v", "ffn_down"):
            want = "q6_k" if i in six_bit else "q4_k"
            assert tensor_kind(f"blk.{i}.{part}.weight", "q4_k_m", 30, 2) == want, (i, part)
        assert tensor_kind(f"blk.{i}.attn_q.weight", "q4_k_m", 30, 2) == "q4_k"
    # The output layer (token_embd when tied) keeps 6 bits in Q4_K_M and in Q4_0 files, and
    # nothing special in Q8_0; norms stay f32.
    for out_type, want in [("q4_k_m", "q6_k"), ("q4_0", "q6_k"), ("q8_0", "q8_0")]:
        assert tensor_kind("output.weight", out_type, 30, 2) == want, out_type
    assert tensor_kind("token_embd.weight", "q4_0", 30, 2) == "q4_0"  # untied: as any weight
    assert tensor_kind("output_norm.weight", "q4_0", 30, 1) == "f32"


def test_q4_0_file_keeps_the_tied_output_at_8_bits_when_rows_are_narrow(tmp_path, smol_tokenizer):
    model = tiny_llama(vocab=len(smol_tokenizer), tie=True)  # hidden 32: Q6_K falls back to Q8_0
    model.save_pretrained(tmp_path / "tied")
    smol_tokenizer.save_pretrained(tmp_path / "tied")
    _, _, tensors = read(write_gguf(tmp_path / "tied", tmp_path / "t.gguf", "q4_0",
                                    tokenizer_pre="smollm"))
    assert tensors["token_embd.weight"].tensor_type == Q.Q8_0
    assert tensors["blk.0.attn_q.weight"].tensor_type == Q.Q4_0
    got = values(tensors["token_embd.weight"])
    ref = model.model.embed_tokens.weight.detach().numpy()
    assert np.abs(got - ref).mean() / np.abs(ref).mean() < 0.01


def test_k_quants_encode_the_same_in_any_chunk_size(monkeypatch):
    from loratune.export import kquants

    x = np.random.default_rng(1).standard_normal((20, 512)).astype(np.float32)
    whole = quantize_q4_k(x), quantize_q6_k(x)
    monkeypatch.setattr(kquants, "CHUNK", 3)   # 40 super-blocks in 14 chunks
    for a, b in zip(whole, (quantize_q4_k(x), quantize_q6_k(x))):
        assert a.shape == b.shape and np.array_equal(a, b)
