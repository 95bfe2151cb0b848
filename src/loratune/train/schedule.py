"""Learning-rate schedules as plain functions of the step (nothing to save on resume)."""

from __future__ import annotations

import math


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the base lr before optimizer step `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule '{kind}' (expected cosine, linear or constant)")
