"""Choosing the next token of one request: greedy, or sampled with temperature / top-k / top-p."""

from __future__ import annotations

import torch

from loratune.serve.types import SamplingParams, ServeError

SEED_MIN, SEED_MAX = -2**63, 2**63 - 1     # OpenAI's seed is an int64


def check_seed(seed: int | None) -> None:
    """A seed is None or an int64 (torch takes some larger values, but not all of them)."""
    if seed is None:
        return
    if not isinstance(seed, int) or not SEED_MIN <= seed <= SEED_MAX:
        raise ServeError(f"seed must be an integer from -2**63 to 2**63 - 1, got {seed!r}",
                         param="seed")


def new_generator(params: SamplingParams) -> torch.Generator | None:
    """A private random stream per request, so a seeded request repeats whatever runs beside it."""
    if params.temperature <= 0:
        return None
    check_seed(params.seed)
    g = torch.Generator()
    if params.seed is not None:
        g.manual_seed(params.seed)
    else:
        g.seed()
    return g


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
               ) -> int:
    """One token from a [vocab] row of logits."""
    if params.temperature <= 0:
        return int(torch.argmax(logits))
    # Sampling on the CPU keeps one generator type for every device.
    return int(torch.multinomial(sampling_probs(logits, params).cpu(), 1, generator=generator))


def sampling_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a sampled token is drawn from: temperature, then top-k, then top-p."""
    # In float64 and shifted so the largest score is 0 before dividing: a tiny temperature
    # (1e-300, 0 in float32) then gives 0 and -inf, not NaN, which multinomial refuses.
    logits = logits.double()
    scores = (logits - logits.max()) / params.temperature
    if params.top_k and params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = torch.cumsum(sorted_p, 0) - sorted_p >= params.top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return probs


def pick_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
               greedy: int) -> int:
    """A row's next token: `greedy` (its argmax, computed for the whole batch at once) or a
    draw, unless the request carries a constraint (a forced tool call: tool_constraint.py),
    which then chooses among the tokens it allows."""
    if params.constraint is not None:
        return params.constraint.choose(logits, params, generator)
    return greedy if params.temperature <= 0 else next_token(logits, params, generator)


def find_stop(text: str, stops: list[str], start: int) -> int | None:
    """Index where the first stop string begins in `text`, looking only at new text from `start`."""
    best = None
    for stop in stops:
        if not stop:
            continue
        i = text.find(stop, max(0, start - len(stop) + 1))
        if i != -1 and (best is None or i < best):
            best = i
    return best


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters might start a stop string (not yet safe to stream)."""
    keep = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                keep = max(keep, n)
                break
    return keep
