#!/usr/bin/env python3
"""A 4-bit linear layer by each `quantization.kernel` against the same layer in bf16 (or fp32).

The issue 15 measurement: an 11008×4096 layer (Llama-2-7B's MLP), forward + backward (input
gradient) at 4096 tokens and forward at one token (decoding), in the compute dtype. Prints ms
per call for a plain nn.Linear holding the dequantized weight, then for Linear4bit with each
kernel that can run here, and the ratio to the plain layer; also the dequantization alone.
Every kernel's output is checked against the torch kernel's first (bit-equal over many rows).

    python benchmarks/nf4_kernels.py                     # CUDA: bf16, 11008x4096
    python benchmarks/nf4_kernels.py --smoke             # CPU, 512x256, torch kernel only
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn


def timed(fn, device: torch.device, repeat: int) -> float:
    """Best-of-`repeat` milliseconds of fn() (after a warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def fwd_bwd(layer: nn.Module, x: torch.Tensor):
    def run():
        x.grad = None
        layer(x).sum().backward()
    return run


def fwd(layer: nn.Module, x: torch.Tensor):
    def run():
        with torch.no_grad():
            layer(x)
    return run


def main() -> None:
    from loratune.quant.kernels import choose_kernel, dequantize
    from loratune.quant.linear4bit import Linear4bit

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out-features", type=int, default=11008)
    p.add_argument("--in-features", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (checks the script)")
    args = p.parse_args()
    if args.smoke:
        args.out_features, args.in_features, args.tokens, args.repeat = 512, 256, 64, 2
        args.dtype = "float32"
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = getattr(torch, args.dtype)

    torch.manual_seed(0)
    lin = nn.Linear(args.in_features, args.out_features, bias=False)
    lin.weight.data.normal_(0, 0.02)
    kernels = []
    for k in ("torch", "triton", "bitsandbytes"):
        try:
            choose_kernel(k, device)
            kernels.append(k)
        except ValueError as err:
            print(f"skip {k}: {err}")
    layers = {k: Linear4bit.from_linear(lin, compute_dtype=dtype, kernel=k).to(device)
              for k in kernels}
    plain = nn.Linear(args.in_features, args.out_features, bias=False, device=device,
                      dtype=dtype).requires_grad_(False)
    plain.weight.copy_(layers["torch"].dequantize(dtype))

    many = torch.randn(args.tokens, args.in_features, device=device, dtype=dtype,
                       requires_grad=True)
    one = torch.randn(1, args.in_features, device=device, dtype=dtype)
    with torch.no_grad():
        ref = layers["torch"](many)
        for k, layer in layers.items():
            same = torch.equal(layer(many), ref)
            print(f"{k}: {args.tokens}-token output bit-equal to torch's: {same}")

    print(f"\n{args.out_features}x{args.in_features}, {args.dtype}, {device} "
          f"({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'})")
    rows = [("fwd+bwd", f"{args.tokens} tokens", fwd_bwd, many), ("fwd", "1 token", fwd, one)]
    print(f"{'':28s}{'plain ms':>10s}" + "".join(f"{k + ' ms':>16s}{'x plain':>9s}"
                                                  for k in kernels))
    for what, size, make, x in rows:
        base = timed(make(plain, x), device, args.repeat)
        cells = ""
        for k in kernels:
            ms = timed(make(layers[k], x), device, args.repeat)
            cells += f"{ms:16.3f}{ms / base:9.2f}"
        print(f"{what + ', ' + size:28s}{base:10.3f}{cells}")
    q = layers["torch"].quantized()
    cells = "".join(f"{timed(lambda k=k: dequantize(q, dtype, k), device, args.repeat):16.3f}"
                    f"{'':9s}" for k in kernels)
    print(f"{'dequantize only':28s}{'':10s}{cells}")


if __name__ == "__main__":
    main()
