"""The next token of every rollout row in one op, seeded per (seed, step, row, token).

Row r's t-th token is drawn by inverse CDF from one uniform number, a hash of (seed, step, r, t)
computed on the device: no generator per row and no Python loop over rows, yet a row samples
the same tokens whatever runs beside it and whichever rows have already finished, on any
device. A resumed run repeats the step, so it samples what the killed one did.
"""

from __future__ import annotations

import hashlib

import torch

from loratune.serve.types import SamplingParams

M32 = 0xFFFFFFFF
SALT_HIGH, SALT_LOW = 0x9E3779B9, 0x7F4A7C15


def _mix(x: torch.Tensor) -> torch.Tensor:
    """Mueller's 32-bit integer hash on int64 values below 2**32: every product stays below
    2**59, so nothing overflows (torch's int64 has no unsigned wrap-around to lean on)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & M32
    return (x >> 16) ^ x


def stream_key(seed: int, step: int) -> int:
    """A 32-bit key of (seed, step); any int seed, negative or past 64 bits, is fine."""
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def uniforms(key: int, rows: torch.Tensor, token: int) -> torch.Tensor:
    """(B,) float64 in [0, 1) with 53 random bits, one per row id in `rows` (int64)."""
    h = _mix(_mix(rows ^ key) ^ (token & M32))
    high = _mix(h ^ SALT_HIGH) >> 5              # 27 bits
    low = _mix(h ^ SALT_LOW) >> 6                # 26 bits
    return (high * (1 << 26) + low).double() / float(1 << 53)


def sample_tokens(logits: torch.Tensor, params: SamplingParams,
                  u: torch.Tensor | None) -> torch.Tensor:
    """(B,) token ids from (B, V) logits: greedy at temperature 0, else sampled at temperature
    with top-k / top-p, row b by its uniform u[b]."""
    if params.temperature <= 0:
        return logits.argmax(-1)
    # float64, shifted so the top score is 0 before dividing: a tiny temperature gives 0 and
    # -inf, not NaN (as serve/sampling.next_token).
    scores = logits.double()
    scores = (scores - scores.max(-1, keepdim=True).values) / params.temperature
    if params.top_k and params.top_k < scores.size(-1):
        kth = torch.topk(scores, params.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    order = None
    if params.top_p < 1.0:
        probs, order = torch.sort(probs, dim=-1, descending=True)
        # The smallest prefix whose mass reaches top_p (the first token always stays).
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= params.top_p, 0.0)
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    # The first token whose cdf exceeds the target (right=True), so never one of probability
    # 0; the target stays below the total, which u * total can round up to.
    target = torch.minimum(u.to(cdf.device)[:, None] * total, torch.nextafter(total, total * 0))
    pick = torch.searchsorted(cdf, target, right=True)
    return (pick if order is None else order.gather(-1, pick))[:, 0]
