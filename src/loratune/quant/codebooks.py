"""Code tables for 4-bit (NF4, FP4) and 8-bit dynamic quantization (bitsandbytes' formats)."""

from __future__ import annotations

from functools import lru_cache

import torch

# NormalFloat4: quantiles of N(0, 1) scaled to [-1, 1], with an exact zero (QLoRA paper).
NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# FP4 (1 sign, 2 exponent, 1 mantissa bit, bias 2) in bit-pattern order, normalized by 12.
_FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
            -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)


@lru_cache(maxsize=None)
def code_4bit(kind: str) -> torch.Tensor:
    if kind == "nf4":
        return torch.tensor(NF4, dtype=torch.float32)
    if kind == "fp4":
        return torch.tensor(_FP4_RAW, dtype=torch.float32) / 12.0
    raise ValueError(f"unknown 4-bit type '{kind}' (expected nf4 or fp4)")


@lru_cache(maxsize=None)
def dynamic_map(signed: bool = True) -> torch.Tensor:
    """The 8-bit dynamic (exponent) map: decades 1e-6 .. 1e0, more linear steps per decade.

    Signed: 2^i steps per decade i and their negatives; unsigned (for non-negative values such
    as Adam's second moment): 2^(i+1) steps. Built with the same float32 arithmetic as
    bitsandbytes' `create_dynamic_map`, so that codes agree bit for bit.
    """
    values: list[float] = []
    for i in range(7):
        steps = 2**i if signed else 2 ** (i + 1)
        edges = torch.linspace(0.1, 1, steps + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (i - 6)
        values += (scale * mids).tolist()  # float32 products
        if signed:
            values += (-scale * mids).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)
