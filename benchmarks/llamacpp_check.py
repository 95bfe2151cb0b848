#!/usr/bin/env python3
"""Our GGUF exports run by llama.cpp itself (llama-cpp-python), against transformers.

Needs `pip install llama-cpp-python` (builds llama.cpp from the PyPI sdist: ~20 min on 2
cores; the default test suite does not need it). Uses a trained demo adapter if given.

    python benchmarks/llamacpp_check.py --adapter runs/demo-…/adapter

Prints: tokenizer equality, greedy-equal prompts (f16 GGUF vs transformers on the same f16
weights; LoRA GGUF via --lora vs the merged GGUF), perplexity ratio, mean KL divergence and
top-1 agreement of q8_0/q4_0/q4_k_m vs f16 for our files and for llama.cpp's own quantizer
applied to our f16 file (perplexity targets: within 1% and 10%), file sizes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--adapter", required=True, help="a LoRA adapter folder (PEFT format)")
    ap.add_argument("--work", default="runs/llamacpp-check")
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    from loratune.export.llamacpp_check import run_checks

    report = run_checks(args.model, Path(args.adapter), Path(args.work), args.tokens)
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
