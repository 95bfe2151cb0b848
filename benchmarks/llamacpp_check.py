#!/usr/bin/env python3
"""Our GGUF exports run by llama.cpp itself (llama-cpp-python), against transformers.

Needs `pip install llama-cpp-python` (builds llama.cpp from the PyPI sdist: ~20 min on 2
cores; the default test suite does not need it). Uses a trained demo adapter if given.

    python benchmarks/llamacpp_check.py --adapter runs/demo-…/adapter
    python benchmarks/llamacpp_check.py --adapter runs/demo-…/adapter --off-grid
        # the same on weights moved off the embedded model's 4-bit grid (see below)

Prints: tokenizer equality, greedy-equal prompts (f16 GGUF vs transformers on the same f16
weights; LoRA GGUF via --lora vs the merged GGUF), perplexity ratio, mean KL divergence and
top-1 agreement of q8_0/q4_0/q4_k_m vs f16 for our files and for llama.cpp's own quantizer
applied to our f16 file (perplexity targets: within 1% and 10%), file sizes.

`run_checks` is also what `pytest -m llamacpp` (tests/export/test_llamacpp.py) asserts on:
- the GGUF tokenizer gives the same ids as the Hugging Face tokenizer;
- greedy generation from our f16 GGUF equals transformers' greedy generation from the same
  f16 weights (computed in fp32, as llama.cpp accumulates);
- perplexity of q8_0 / q4_0 / q4_k_m relative to f16 on a held-out text, and the mean KL
  divergence of their next-token distributions from f16's, for our files and for llama.cpp's
  own quantizer run on our f16 file (the peer: same weights, same text, same run);
- a LoRA adapter GGUF applied by llama.cpp (`--lora`) gives the merged model's greedy output.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import shutil
from pathlib import Path

import numpy as np
import torch

QUANTS = ("f16", "q8_0", "q4_0", "q4_k_m")
PROMPTS = [
    "Convert the request into a command.\n\nStart a 12 minute timer",
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "把下面的请求转换成命令。\n\n明天早上七点叫醒我",
]


def chat_ids(tokenizer, prompt: str) -> list[int]:
    out = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                        add_generation_prompt=True, return_dict=True)
    return list(out["input_ids"])


def open_gguf(path: Path, lora: Path | None = None, n_ctx: int = 1024):
    from llama_cpp import Llama

    kw = {"lora_path": str(lora)} if lora else {}
    return Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, seed=0,
                 n_threads=2, **kw)


def llamacpp_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0,
                              reset=True):
        if token == llm.token_eos() or len(out) == n:
            break
        out.append(int(token))
    return out


@torch.no_grad()
def hf_greedy(model, ids: list[int], n: int, eos: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                         eos_token_id=eos, pad_token_id=eos, temperature=None, top_p=None,
                         top_k=None)[0, len(ids):].tolist()
    return out[:-1] if out and out[-1] == eos else out


def f16_model(folder: Path):
    """The model with its weights rounded to fp16 and computed in fp32 (llama.cpp's f16 path)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(p.half().float())
    return model


def token_logprobs(llm, ids: list[int]) -> np.ndarray:
    """[len(ids), vocab] log-softmax of llama.cpp's logits after each token (float32)."""
    llm.reset()
    llm.eval(ids)
    logits = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return logp.astype(np.float32)


def perplexity(logp: np.ndarray, ids: list[int]) -> float:
    nll = -logp[np.arange(len(ids) - 1), ids[1:]].astype(np.float64)
    return float(np.exp(nll.mean()))


def divergence(ref: np.ndarray, logp: np.ndarray) -> dict[str, float]:
    """Mean KL(ref ‖ quantized) per position and top-1 agreement. Unlike a perplexity ratio,
    which a few confidently wrong tokens can move either way, both only worsen with noise."""
    kl = (np.exp(ref.astype(np.float64)) * (ref - logp)).sum(-1)
    return {"kl": float(kl.mean()), "top1": float((ref.argmax(-1) == logp.argmax(-1)).mean())}


LLAMACPP_FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
                   "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}


def llamacpp_quantize(src: Path, out: Path, kind: str, threads: int = 2) -> Path:
    """`src` (an f16 GGUF) quantized by llama.cpp's own quantizer (llama-quantize's library
    call): the reference our q8_0 / q4_0 / q4_k_m files are compared with."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMACPP_FTYPES[kind])
    params.nthread = threads
    if llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params)):
        raise RuntimeError(f"llama.cpp could not quantize {src} to {kind} ({out})")
    return out


def heldout_ids(tokenizer, limit: int = 512) -> list[int]:
    """The demo held-out set rendered as chat text: text no model here was trained on."""
    from loratune.config import DataConfig
    from loratune.data import load_conversations
    from loratune.demo import demo_heldout_path

    convs = load_conversations(str(demo_heldout_path()), DataConfig())
    text = "\n".join(tokenizer.apply_chat_template(c, tokenize=False) for c in convs)
    return tokenizer(text).input_ids[:limit]


def export_all(model: str, adapter: Path, work: Path) -> dict[str, Path]:
    """Merged HF folder, its GGUFs (f16, q8_0, q4_0, q4_k_m), the base f16 GGUF, the LoRA GGUF,
    and llama.cpp's own quantizations of our f16 file (`cpp_q8_0` …)."""
    from loratune.export.gguf_file import write_gguf, write_lora_gguf
    from loratune.export.merge import base_folder, merge_folder, read_adapters

    base, tmp = base_folder(model)
    try:  # the base converted from a GGUF lives in a temp folder: remove it whatever happens
        files = {"base": base, "merged": work / "merged"}
        merge_folder(base, read_adapters([adapter], None), files["merged"], overwrite=True)
        for kind in QUANTS:
            files[kind] = write_gguf(files["merged"], work / f"merged-{kind}.gguf", kind,
                                     overwrite=True)
        files["base_f16"] = write_gguf(base, work / "base-f16.gguf", "f16", overwrite=True)
        files["lora"] = write_lora_gguf(adapter, base, work / "lora.gguf", "f32", overwrite=True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    del files["base"]  # gone with tmp (or the user's own folder)
    for kind in QUANTS[1:]:
        files[f"cpp_{kind}"] = llamacpp_quantize(files["f16"], work / f"llamacpp-{kind}.gguf", kind)
    return files


def run_checks(model: str, adapter: Path, work: Path, n_tokens: int = 32) -> dict:
    from transformers import AutoTokenizer

    work.mkdir(parents=True, exist_ok=True)
    files = export_all(model, adapter, work)
    tok = AutoTokenizer.from_pretrained(files["merged"])
    eos = tok.eos_token_id
    hf = f16_model(files["merged"])
    report: dict = {"prompts": len(PROMPTS), "tokens": n_tokens}

    llm = open_gguf(files["f16"])
    report["tokenizer_equal"] = all(
        llm.tokenize(p.encode(), add_bos=False, special=False) == tok(p).input_ids
        for p in PROMPTS)
    greedy_hf = [hf_greedy(hf, chat_ids(tok, p), n_tokens, eos) for p in PROMPTS]
    greedy_cpp = [llamacpp_greedy(llm, chat_ids(tok, p), n_tokens) for p in PROMPTS]
    report["greedy_equal"] = sum(a == b for a, b in zip(greedy_hf, greedy_cpp))
    report["sample"] = {"prompt": PROMPTS[0], "transformers": tok.decode(greedy_hf[0]),
                        "llama.cpp": tok.decode(greedy_cpp[0])}
    ids = heldout_ids(tok)
    report["heldout_tokens"] = len(ids)
    ref = token_logprobs(llm, ids)
    del llm
    ppl = {"f16": perplexity(ref, ids)}
    div = {}
    for kind in [k for k in files if k in QUANTS[1:] or k.startswith("cpp_")]:
        q = open_gguf(files[kind])
        logp = token_logprobs(q, ids)
        del q
        ppl[kind], div[kind] = perplexity(logp, ids), divergence(ref, logp)
    report["perplexity"] = ppl
    report["perplexity_ratio"] = {k: v / ppl["f16"] for k, v in ppl.items() if k != "f16"}
    report["kl_divergence"] = {k: v["kl"] for k, v in div.items()}
    report["top1_agreement"] = {k: v["top1"] for k, v in div.items()}
    with_lora = open_gguf(files["base_f16"], lora=files["lora"])
    greedy_lora = [llamacpp_greedy(with_lora, chat_ids(tok, p), n_tokens) for p in PROMPTS]
    report["lora_greedy_equal"] = sum(a == b for a, b in zip(greedy_cpp, greedy_lora))
    report["sizes_mib"] = {k: round(Path(files[k]).stat().st_size / 2**20, 1)
                           for k in files if k != "merged"}
    return report


def off_grid_model(model: str, out: Path, seed: int = 0) -> Path:
    """`model` as a plain folder with every 2-D weight moved by uniform noise of ±½ its Q4_1
    step (per 32 values): the embedded model comes from a Q4_1 GGUF, so its weights sit on a
    4-bit grid that flatters some encoders; this model is as far from it as Q4_1 was."""
    import torch
    from safetensors.torch import load_file, save_file

    from loratune.export.merge import base_folder, merge_folder

    base, tmp = base_folder(model)
    try:
        merge_folder(base, [], out, overwrite=True)
    finally:
        if tmp is not None:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    g = torch.Generator().manual_seed(seed)
    for shard in sorted(out.glob("*.safetensors")):
        tensors = load_file(str(shard))
        for key, t in tensors.items():
            if t.dim() == 2 and t.numel() % 32 == 0:
                x = t.float().reshape(-1, 32)
                step = (x.max(1, keepdim=True).values - x.min(1, keepdim=True).values) / 15
                noise = (torch.rand(x.shape, generator=g) - 0.5) * step
                tensors[key] = (x + noise).reshape(t.shape).to(t.dtype)
        save_file(tensors, str(shard), metadata={"format": "pt"})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--adapter", required=True, help="a LoRA adapter folder (PEFT format)")
    ap.add_argument("--work", default="runs/llamacpp-check")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--off-grid", action="store_true",
                    help="check a copy of the model with its weights moved off the 4-bit grid")
    args = ap.parse_args()
    model = args.model
    if args.off_grid:
        model = str(off_grid_model(args.model, Path(args.work) / "off-grid-base"))
    report = run_checks(model, Path(args.adapter), Path(args.work), args.tokens)
    print(json.dumps(report, indent=2, ensure_ascii=False))
    n = report["prompts"]
    print(f"\ntokenizer equal: {report['tokenizer_equal']}")
    print(f"greedy {args.tokens} tokens, f16 GGUF vs transformers: {report['greedy_equal']}/{n}")
    print(f"greedy, base GGUF + LoRA GGUF vs merged GGUF: {report['lora_greedy_equal']}/{n}")
    ratio, kl, top1 = report["perplexity_ratio"], report["kl_divergence"], report["top1_agreement"]
    print("\nvs f16 on the held-out text   ours: ppl ratio / mean KL / top-1   "
          "llama.cpp's quantizer on our f16 file: same")
    for kind in ("q8_0", "q4_0", "q4_k_m"):
        peer = f"cpp_{kind}"
        target = 1.01 if kind == "q8_0" else 1.10
        print(f"{kind:7s} {ratio[kind]:.4f} / {kl[kind]:.4f} / {top1[kind]:.3f}   "
              f"{ratio[peer]:.4f} / {kl[peer]:.4f} / {top1[peer]:.3f}   "
              f"(ppl target <= {target}: {'ok' if ratio[kind] <= target else 'MISSED'}; "
              f"KL vs llama.cpp's {kl[kind] / kl[peer]:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
