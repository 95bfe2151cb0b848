#!/usr/bin/env python3
"""NF4 quantization of every linear layer of the embedded model: loratune vs bitsandbytes (CPU).

Both quantize the same fp32 weights (blocks of 64, double quantization); the script prints
the time each takes (best of --repeat), bytes that differ, and the dequantization error of
each against the original weights (mean and max abs), which must match.

    python benchmarks/nf4.py            # SmolLM2-135M-Instruct, 210 linear layers
    python benchmarks/nf4.py --repeat 1
"""

from __future__ import annotations

import argparse
import time

import torch


def linear_weights(model_name: str) -> list[tuple[str, torch.Tensor]]:
    from loratune.models import load_model

    model, _ = load_model(model_name)
    head = model.get_output_embeddings()
    return [(n, m.weight.detach().float().contiguous()) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m is not head]


def best_time(fn, repeat: int) -> tuple[float, list]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    import bitsandbytes.functional as bnb_f

    from loratune.quant import dequantize_4bit, quantize_4bit

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--type", default="nf4", choices=["nf4", "fp4"])
    args = p.parse_args()

    weights = linear_weights(args.model)
    n = sum(w.numel() for _, w in weights)
    ours_s, ours = best_time(lambda: [quantize_4bit(w, 64, args.type) for _, w in weights],
                             args.repeat)
    theirs_s, theirs = best_time(
        lambda: [bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=True,
                                     quant_type=args.type) for _, w in weights], args.repeat)

    packed_diff = absmax_diff = 0
    err = {"loratune": [0.0, 0.0], "bitsandbytes": [0.0, 0.0]}
    for (_, w), q, (packed, state) in zip(weights, ours, theirs):
        packed_diff += int((q.packed != packed.view(-1)).sum())
        absmax_diff += int((q.absmax != state.absmax).sum())
        for name, deq in (("loratune", dequantize_4bit(q)),
                          ("bitsandbytes", bnb_f.dequantize_4bit(packed, state))):
            e = (deq - w).abs()
            err[name][0] += float(e.sum())
            err[name][1] = max(err[name][1], float(e.max()))
    blocks = sum(q.absmax.numel() for q in ours)

    print(f"{args.type.upper()} blocks of 64 + double quant, {len(weights)} linear layers of "
          f"{args.model}, {n / 1e6:.1f}M weights, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), best of {args.repeat}")
    print(f"{'':<14}{'seconds':>9}{'Mweights/s':>12}{'mean abs err':>15}{'max abs err':>13}")
    for name, secs in (("loratune", ours_s), ("bitsandbytes", theirs_s)):
        print(f"{name:<14}{secs:>9.2f}{n / secs / 1e6:>12.1f}{err[name][0] / n:>15.3e}"
              f"{err[name][1]:>13.3e}")
    print(f"time loratune / bitsandbytes: {ours_s / theirs_s:.2f}")
    print(f"packed bytes that differ: {packed_diff} of {sum(q.packed.numel() for q in ours)}; "
          f"8-bit scale codes that differ: {absmax_diff} of {blocks} "
          f"(bnb's CPU kernel rounds some near-midpoint scales to the farther code)")


if __name__ == "__main__":
    main()
