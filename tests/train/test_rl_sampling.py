"""Batched rollout sampling: the right distribution, seeded per (seed, step, row, token)."""

from __future__ import annotations

import pytest
import torch

from loratune.serve.types import SamplingParams
from loratune.train.rl_sampling import sample_tokens, stream_key, uniforms

LOGITS = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
DRAWS = 40_000


def _frequencies(params: SamplingParams) -> torch.Tensor:
    rows = torch.arange(DRAWS)
    picked = sample_tokens(LOGITS.expand(DRAWS, -1), params, uniforms(stream_key(7, 0), rows, 3))
    return torch.bincount(picked, minlength=LOGITS.numel()).double() / DRAWS


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_samples_follow_the_tempered_softmax(temperature):
    want = torch.softmax(LOGITS.double() / temperature, -1)
    got = _frequencies(SamplingParams(temperature=temperature))
    assert (got - want).abs().max() < 0.01, (got, want)


def test_top_p_and_top_k_cut_the_tail():
    probs = torch.softmax(LOGITS.double(), -1)        # order: 0, 1, 4, 2, 3
    got = _frequencies(SamplingParams(temperature=1.0, top_p=0.8))
    kept = probs[[0, 1, 4]]                           # 0.47 + 0.17 < 0.8, + 0.10 reaches it
    assert got[[2, 3]].sum() == 0
    assert (got[[0, 1, 4]] - kept / kept.sum()).abs().max() < 0.01
    got = _frequencies(SamplingParams(temperature=1.0, top_k=2))
    assert got[[2, 3, 4]].sum() == 0
    assert abs(float(got[0]) - float(probs[0] / probs[:2].sum())) < 0.01


def test_greedy_and_a_vanishing_temperature_pick_the_top_token():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    want = logits.argmax(-1)
    u = uniforms(1, torch.arange(6), 0)
    assert torch.equal(sample_tokens(logits, SamplingParams(temperature=0.0), u), want)
    assert torch.equal(sample_tokens(logits, SamplingParams(temperature=1e-300), u), want)


def test_uniforms_depend_on_seed_step_row_and_token_only():
    rows = torch.arange(1000)
    u = uniforms(stream_key(3, 4), rows, 5)
    assert u.dtype == torch.float64 and 0 <= float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.03 and len(set(u.tolist())) == 1000
    # A row's number is its own: the same whatever other rows are asked for with it.
    assert torch.equal(uniforms(stream_key(3, 4), rows[[7, 500]], 5), u[[7, 500]])
    for other in (uniforms(stream_key(3, 5), rows, 5), uniforms(stream_key(4, 4), rows, 5),
                  uniforms(stream_key(3, 4), rows, 6)):
        assert (other != u).float().mean() > 0.99
    assert stream_key(-1, 0) != stream_key(2**70, 0)


def test_a_token_of_probability_zero_is_never_drawn_at_either_end_of_u():
    logits = torch.tensor([[-float("inf"), 0.0, -float("inf"), 1.0, -float("inf")]] * 2)
    u = torch.tensor([0.0, 1.0 - 2.0**-53])
    assert sample_tokens(logits, SamplingParams(temperature=1.0), u).tolist() == [1, 3]
    top_k = SamplingParams(temperature=1.0, top_k=1)
    assert sample_tokens(logits, top_k, u).tolist() == [3, 3]


def test_uniforms_carry_53_bits():
    u = uniforms(stream_key(0, 0), torch.arange(64), 0)
    assert ((u * 2.0**53) % 2.0**26 != 0).any()
