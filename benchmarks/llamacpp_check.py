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
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


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
    from loratune.export.llamacpp_check import run_checks

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
