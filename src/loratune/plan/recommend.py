"""What to set for a given memory: micro-batch, accumulation, checkpointing, optimizer, seq."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from loratune.plan.memory import Setup, estimate
from loratune.plan.shapes import ModelShape

GiB = 2**30
GPUS = {  # name: (label, bytes); a "24 GB" card reports 24 GiB (24564 MiB on an RTX 4090)
    "rtx3060": ("RTX 3060 12 GB", 12 * GiB),
    "rtx4090": ("RTX 4090 24 GB", 24 * GiB),
    "a100-40": ("A100 40 GB", 40 * GiB),
    "a100-80": ("A100 80 GB", 80 * GiB),
    "h100": ("H100 80 GB", 80 * GiB),
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(gib|gb|g|mib|mb|m)?\s*$", re.IGNORECASE)
_UNIT = {"gib": GiB, "gb": 1e9, "g": 1e9, "mib": 2**20, "mb": 1e6, "m": 1e6, None: 1e9}


def parse_memory(text: str) -> tuple[str, int]:
    """'24GB', '24GiB', '12g', '16' (GB) or a GPU name -> (label, bytes)."""
    key = text.strip().lower().replace(" ", "")
    if key in GPUS:
        label, size = GPUS[key]
        return label, int(size)
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"--gpu '{text}': expected a size such as 24GB / 24GiB / 12g, or one "
                         f"of {', '.join(GPUS)}")
    unit = m.group(2).lower() if m.group(2) else None
    size = int(float(m.group(1)) * _UNIT[unit])
    return text.strip(), size


@dataclass(frozen=True)
class Advice:
    setup: Setup
    total: int
    grad_accum: int
    note: str = ""


def largest_batch(shape: ModelShape, setup: Setup, memory: int, limit: int = 1024) -> int:
    """The largest micro-batch that fits (0 if even 1 does not)."""
    lo, hi = 0, 1
    while hi <= limit and estimate(shape, replace(setup, batch=hi)).total <= memory:
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:  # the total grows with the batch: bisect between lo (fits) and hi
        mid = (lo + hi) // 2
        if estimate(shape, replace(setup, batch=mid)).total <= memory:
            lo = mid
        else:
            hi = mid
    return lo


def longest_seq(shape: ModelShape, setup: Setup, memory: int, limit: int = 131072) -> int:
    seq, best = 128, 0
    while seq <= limit and estimate(shape, replace(setup, batch=1, seq=seq)).total <= memory:
        best, seq = seq, seq * 2
    return best


def recommend(shape: ModelShape, setup: Setup, memory: int, target_batch: int = 16) -> list[Advice]:
    """Settings that fit `memory`, leanest last; empty when nothing fits."""
    out = []
    for optimizer in ("adamw", "adamw8bit"):
        for ckpt in (False, True):
            s = replace(setup, optimizer=optimizer, checkpointing=ckpt)
            batch = largest_batch(shape, s, memory)
            if batch:
                batch = min(batch, target_batch)
                s = replace(s, batch=batch)
                # train.grad_accum counts the micro-batches of all GPUs: a multiple of gpus
                accum = math.ceil(math.ceil(target_batch / batch) / s.gpus) * s.gpus
                out.append(Advice(s, estimate(shape, s).total, accum))
        if out:  # 8-bit states only when 32-bit ones leave nothing that fits
            break
    return out


def leanest_total(shape: ModelShape, setup: Setup) -> int:
    lean = replace(setup, batch=1, seq=min(setup.seq, 256), checkpointing=True,
                   optimizer="adamw8bit")
    return estimate(shape, lean).total
