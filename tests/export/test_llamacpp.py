"""GGUF exports run by real llama.cpp (opt-in: `pytest -m llamacpp`, needs llama-cpp-python).

The checks themselves are benchmarks/llamacpp_check.py's `run_checks` (a harness, not part of
the installed package)."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.llamacpp
llama_cpp = pytest.importorskip("llama_cpp")

HARNESS = Path(__file__).parents[2] / "benchmarks" / "llamacpp_check.py"


def run_checks(*args, **kwargs) -> dict:
    spec = importlib.util.spec_from_file_location("llamacpp_check", HARNESS)
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    return harness.run_checks(*args, **kwargs)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from loratune.adapters import add_adapter, save_adapter
    from loratune.config import LoraConfig, ModelConfig
    from loratune.models import load_model

    work = tmp_path_factory.mktemp("llamacpp")
    model, _ = load_model(ModelConfig())
    torch.manual_seed(0)
    add_adapter(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    save_adapter(model, work / "adapter")
    return run_checks("smollm2-135m-instruct", work / "adapter", work, n_tokens=32)


def test_tokenizer_and_greedy_match_transformers(report):
    assert report["tokenizer_equal"]
    assert report["greedy_equal"] == report["prompts"], report["sample"]


def test_lora_gguf_in_llamacpp_equals_the_merged_model(report):
    assert report["lora_greedy_equal"] == report["prompts"]


def test_quantized_files_as_good_as_llamacpps_own_quantizer(report):
    # The perplexity ratio alone cannot judge 4-bit files of this model: llama.cpp's own
    # q4_k_m of our f16 file is ~1.17× on the held-out text (benchmarks/README.md). The peer
    # is llama.cpp's quantizer on the same file, judged by KL divergence from f16.
    ratio, kl, top1 = report["perplexity_ratio"], report["kl_divergence"], report["top1_agreement"]
    # q8_0 ≤ 1.01× holds with the demo adapter (benchmarks/README.md); with a random LoRA
    # llama.cpp's own q8_0 varies from 0.995× to 1.015×, so ours is held to llama.cpp's figure.
    assert kl["q8_0"] < 0.01 and abs(ratio["q8_0"] - ratio["cpp_q8_0"]) <= 0.01, (ratio, kl)
    for kind in ("q8_0", "q4_0", "q4_k_m"):
        assert kl[kind] <= 1.15 * kl[f"cpp_{kind}"], (kind, kl)
        assert top1[kind] >= top1[f"cpp_{kind}"] - 0.03, (kind, top1)
    assert report["sizes_mib"]["q4_0"] == report["sizes_mib"]["cpp_q4_0"]  # same mix


# -- every family of tests/families.py, and the real gemma3-270m --------------------------------
from families import FAMILIES, FAMILY_SPECS, build_family, save_family  # noqa: E402

TEXTS = ["What is the capital of France?", "apple apple  apple, river 42 1234567!",
         "Größe ünd naïve ✅ 你好\n\n  indented"]


def _open(path, lora=None, n_ctx=128):
    from llama_cpp import Llama

    kw = {"lora_path": str(lora)} if lora else {}
    return Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, seed=0,
                 n_threads=2, **kw)


def _logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return torch.tensor(np.asarray(llm.scores[:len(ids)]), dtype=torch.float32)


def _greedy(llm, ids, n):
    llm.reset()
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0, reset=True):
        if len(out) == n:
            break
        out.append(int(token))
    return out


@torch.no_grad()
def _hf_greedy(model, ids, n):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def _regimes(model, tok):
    """(n_ctx, prompt ids) to run: one chat prompt; for longrope models (Phi-3.5, Phi-4-mini)
    one within the original context (short factors on both sides: transformers picks them by
    sequence length, llama.cpp by n_ctx) and one past it (long factors on both sides)."""
    def chat(text):
        return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                       add_generation_prompt=True, return_dict=True)["input_ids"]
    rope = dict(model.config.rope_parameters)
    if rope.get("rope_type") != "longrope":
        return [(128, chat("What is the capital of France?"))]
    orig = model.config.original_max_position_embeddings
    short = chat("Capital of France?")
    long = chat(" ".join(["What is the capital of France?"] * 40))
    assert len(short) + 20 <= orig < len(long) and len(long) + 20 <= 2 * orig
    return [(orig, short), (2 * orig, long)]


def _with_context(folder, orig=256):
    """The family's model with its original context at `orig` (max 4x): llama.cpp rounds
    n_ctx up to a multiple of 256, so it picks the short factors only when the original
    context is at least that."""
    from transformers import AutoModelForCausalLM

    config = json.loads((folder / "config.json").read_text())
    config["original_max_position_embeddings"] = orig
    config["max_position_embeddings"] = 4 * orig
    config["rope_parameters"]["original_max_position_embeddings"] = orig
    (folder / "config.json").write_text(json.dumps(config))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.config._attn_implementation = "eager"
    return model


def _check_greedy(llm, model, ids, n=20):
    """transformers' greedy run; llama.cpp scoring the same sequence (teacher-forced) within
    1e-3 and picking the same token at every step but near-ties (top-2 gap within twice the
    largest logit difference); llama.cpp's own incremental greedy equal to transformers' up to
    the first step with a top-2 gap under 1e-2. Returns the number of steps compared so."""
    hf = _hf_greedy(model, ids, n)
    seq = ids + hf
    with torch.no_grad():
        ref = model(torch.tensor([seq])).logits[0]
    got = _logits(llm, seq)
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-3)
    steps = slice(len(ids) - 1, len(seq) - 1)
    top2 = ref[steps].topk(2, -1).values
    gap = top2[:, 0] - top2[:, 1]
    # where both sides differ by at most d, the pick can only flip if the top two logits are
    # within 2d of each other
    clear = (gap > 2 * (got - ref)[steps].abs().max()).tolist()
    picked, wanted = got[steps].argmax(-1).tolist(), ref[steps].argmax(-1).tolist()
    assert [p for p, c in zip(picked, clear) if c] == [w for w, c in zip(wanted, clear) if c]
    # incremental decoding (KV cache) moves logits by up to ~1e-3 on either side (seen on the
    # LoRA-adapted Llama 3.1): compare the two greedy runs up to the first step closer than 1e-2
    k = int((gap < 1e-2).nonzero()[0]) if (gap < 1e-2).any() else n
    assert _greedy(llm, ids, n)[:k] == hf[:k]
    return k


@pytest.mark.parametrize("name", FAMILIES)
def test_family_gguf_runs_in_llamacpp_as_in_transformers(name, tmp_path):
    """f32 GGUF in llama.cpp: the same token ids for plain text; the same greedy run as
    transformers, logits within 1e-3 (fp32 both sides); the adapter-only GGUF through --lora
    gives the adapted model's logits and greedy run."""
    from loratune.adapters import add_adapter, save_adapter
    from loratune.config import LoraConfig
    from loratune.export.gguf_file import write_gguf, write_lora_gguf
    from tiny import randomize_lora

    folder = save_family(name, tmp_path / name)
    model, tok = build_family(name)
    if dict(model.config.rope_parameters).get("rope_type") == "longrope":
        model = _with_context(folder)
    path = write_gguf(folder, tmp_path / "m.gguf", "f32")
    regimes = _regimes(model, tok)
    for n_ctx, ids in regimes:
        llm = _open(path, n_ctx=n_ctx)
        for text in TEXTS:
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok(
                text, add_special_tokens=False).input_ids, text
        _check_greedy(llm, model, ids)
        del llm
    targets = ["qkv_proj", "o_proj"] if FAMILY_SPECS[name].fused else ["q_proj", "k_proj",
                                                                         "v_proj", "down_proj"]
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    randomize_lora(model, scale=0.5)
    save_adapter(model, tmp_path / "ad")
    lora = write_lora_gguf(tmp_path / "ad", folder, tmp_path / "lora.gguf")
    for n_ctx, ids in regimes:
        with_lora = _open(path, lora, n_ctx=n_ctx)
        _check_greedy(with_lora, model, ids)
        del with_lora


@pytest.mark.slow
def test_gemma3_270m_in_llamacpp_as_in_transformers(tmp_path):
    """The real gemma3-270m (weights as our cache holds them) exported to f32 GGUF: llama.cpp's
    greedy continuation equals transformers' on the same weights."""
    import importlib.util

    from loratune.export.gguf_file import write_gguf
    from loratune.models import load_model
    from loratune.models.load import EMBEDDED, embedded_folder

    if importlib.util.find_spec(EMBEDDED["gemma3-270m"].package) is None:
        pytest.skip("gemma3-270m is not installed (loratune models install gemma3-270m)")
    model, tok = load_model("gemma3-270m")
    path = write_gguf(embedded_folder("gemma3-270m"), tmp_path / "g.gguf", "f32")
    llm = _open(path)
    for prompt in ["The capital of France is", "def fibonacci(n):", "Once upon a time"]:
        ids = tok(prompt).input_ids
        assert llm.tokenize(prompt.encode(), add_bos=True, special=False) == ids
        assert _greedy(llm, ids, 24) == _hf_greedy(model, ids, 24), prompt
