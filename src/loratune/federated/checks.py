"""What the server checks in each client update before it counts: the base it was trained on,
the round it answers, its keys and shapes, finite values, a positive example count. A failed
check refuses that client's update (by its id, with the reason); the round goes on without it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loratune.federated.aggregate import is_lora_a, is_lora_b
from loratune.federated.privacy import norm_refusal


# Counts are weights: inf (or two near float max) would make the mean NaN, a fraction is no count.
MAX_EXAMPLES = 2**53


@dataclass
class Expected:
    """What a valid update of round `round` looks like."""

    round: int
    fingerprint: str
    shapes: dict[str, tuple[int, ...]]  # file key -> shape, of the keys clients must send
    free_rank: bool = False  # svd: a client's LoRA rank may differ from the global one
    clip: float | None = None  # federated.privacy.clip: the update's norm bound
    start: dict[str, torch.Tensor] | None = None  # what was sent (the update's origin)


def refusal(expected: Expected, rnd: int, fingerprint: str, examples: float,
            state: dict[str, torch.Tensor]) -> str | None:
    """Why this update is refused, or None when it counts."""
    if fingerprint != expected.fingerprint:
        return (f"base fingerprint {fingerprint[:12]} differs from the server's "
                f"{expected.fingerprint[:12]} (another base model or config)")
    if rnd != expected.round:
        return f"stale round {rnd} (the server is at round {expected.round})"
    if not (0 < examples <= MAX_EXAMPLES and float(examples).is_integer()):
        return f"num-examples {examples}: expected a whole count from 1 to 2**53"
    why = key_refusal(expected, state) or value_refusal(state)
    if why is None and expected.free_rank:  # svd: the mean of the products is factored
        why = product_refusal(state)
    if why is None and expected.clip is not None:
        why = norm_refusal(expected.clip, state, expected.start)
    return why


def key_refusal(expected: Expected, state: dict[str, torch.Tensor]) -> str | None:
    missing = [k for k in expected.shapes if k not in state]
    if missing:
        return f"tensor {missing[0]} missing ({len(missing)} missing)"
    extra = [k for k in state if k not in expected.shapes]
    if extra:
        return f"tensor {extra[0]} unexpected ({len(extra)} unexpected)"
    for key, tensor in state.items():
        want, got = expected.shapes[key], tuple(tensor.shape)
        if got != want and not (expected.free_rank and rank_only(key, got, want)):
            return f"tensor {key} has shape {got}, expected {want}"
        sent = expected.start[key].dtype if expected.start is not None else tensor.dtype
        if tensor.dtype != sent:  # the mean takes the first client's dtype: fp16 overflows
            return f"tensor {key} has dtype {tensor.dtype}, expected {sent} (as sent)"
    return rank_mismatch(state)


def rank_mismatch(state: dict[str, torch.Tensor]) -> str | None:
    """A LoRA pair whose A and B disagree on the rank (their product would not exist)."""
    for key, a in state.items():
        b = state.get(key[: -len("lora_A.weight")] + "lora_B.weight") if is_lora_a(key) else None
        if b is not None and a.dim() == b.dim() == 2 and a.shape[0] != b.shape[1]:
            return f"tensor {key} has rank {a.shape[0]} but its lora_B rank {b.shape[1]}"
    return None


def rank_only(key: str, got: tuple[int, ...], want: tuple[int, ...]) -> bool:
    """A LoRA factor that differs from the global one in its rank dimension only."""
    if len(got) != 2 or len(want) != 2:
        return False
    if is_lora_a(key):
        return got[1] == want[1]
    return is_lora_b(key) and got[0] == want[0]


def value_refusal(state: dict[str, torch.Tensor]) -> str | None:
    for key, tensor in state.items():
        bad = int((~torch.isfinite(tensor)).sum()) if tensor.is_floating_point() else 0
        if bad:
            return f"tensor {key} has {bad} non-finite values (NaN/inf)"
    return None


def product_refusal(state: dict[str, torch.Tensor]) -> str | None:
    """A LoRA pair of finite factors whose product B·A overflows float32: the SVD rule's mean
    of products would be inf and linalg.svd fails for the whole round."""
    for key, a in state.items():
        b = state.get(key[: -len("lora_A.weight")] + "lora_B.weight") if is_lora_a(key) else None
        if b is not None and not torch.isfinite(b.float() @ a.float()).all():
            return f"tensor {key}: the product B·A is not finite in float32 (values too large)"
    return None
