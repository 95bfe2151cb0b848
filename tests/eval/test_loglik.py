"""Batched log-likelihood with the context's cache reused equals one plain forward per row."""

import math

import pytest
import torch

from loratune.adapters import add_adapter, set_active
from loratune.config import LoraConfig, PromptConfig
from loratune.eval.loglik import can_reuse_cache, prefill, score_items, score_options, score_rows
from tiny import randomize_lora, tiny_llama, unigram_llama

CONTEXTS = [[5, 9, 3, 7], [5, 9, 3, 2, 8, 1]]
OPTIONS = [[4], [6, 2, 11], [17, 3], [4, 4, 4, 4, 4]]


def by_hand(model, ctx, cont) -> float:
    """Sum of log p(token | everything before it), from one forward of context + continuation."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].float(), -1)
    return sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))


@pytest.mark.parametrize("batch", [1, 3, 16])
def test_cached_options_equal_a_forward_per_row(batch):
    model = tiny_llama()
    for ctx in CONTEXTS:
        cached = score_options(model, prefill(model, ctx), OPTIONS, batch_size=batch)
        plain = score_rows(model, [(ctx, o) for o in OPTIONS], batch_size=batch)
        for c, p, o in zip(cached, plain, OPTIONS):
            assert c.logprob == pytest.approx(by_hand(model, ctx, o), abs=1e-4)
            assert p.logprob == pytest.approx(by_hand(model, ctx, o), abs=1e-4)
            assert c.tokens == len(o) and c.greedy == p.greedy


def test_a_shared_prefix_is_run_once_and_gives_the_same_scores():
    model = tiny_llama()
    items = [(ctx, OPTIONS) for ctx in CONTEXTS]
    shared = score_items(model, items, prefix=[5, 9, 3])
    plain = score_items(model, items, reuse_cache=False)
    assert [[round(s.logprob, 4) for s in row] for row in shared] == \
        [[round(s.logprob, 4) for s in row] for row in plain]
    calls = []
    model.model.register_forward_hook(lambda m, a, kw, out: calls.append(1), with_kwargs=True)
    score_items(model, items, batch_size=16, prefix=[5, 9, 3])
    # the prefix, then both items' rests of context together (padded between the prefix and
    # the shorter rest), then all 8 options together
    assert len(calls) == 3
    calls.clear()
    one_by_one = score_items(model, items, batch_size=4, prefix=[5, 9, 3])
    assert len(calls) == 1 + 2 * len(CONTEXTS)  # 4 options a forward: one item at a time
    assert [[round(s.logprob, 4) for s in row] for row in one_by_one] == \
        [[round(s.logprob, 4) for s in row] for row in plain]


def test_unigram_model_log_likelihood_by_hand():
    """logits 3 for token 7, 0 for the other 127: log p(7) = 3 - log(e^3 + 127)."""
    model = unigram_llama({7: 3.0}, vocab=128)
    other = -math.log(math.exp(3) + 127)
    got = score_items(model, [([1, 2], [[7], [7, 7], [8, 7]])])[0]
    assert [s.logprob for s in got] == pytest.approx([3 + other, 6 + 2 * other, 3 + 2 * other],
                                                     abs=1e-5)
    assert [s.greedy for s in got] == [True, True, False]


def test_adapters_with_virtual_tokens_take_the_plain_path_and_lora_the_cached_one():
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"]), "lora")
    randomize_lora(model)
    set_active(model, "lora")
    assert can_reuse_cache(model)
    cached = score_items(model, [(CONTEXTS[0], OPTIONS)])[0]
    assert [s.logprob for s in cached] == pytest.approx(
        [by_hand(model, CONTEXTS[0], o) for o in OPTIONS], abs=1e-4)
    add_adapter(model, PromptConfig(num_virtual_tokens=3), "prompt")
    set_active(model, "prompt")
    assert not can_reuse_cache(model)
    got = score_items(model, [(CONTEXTS[0], OPTIONS)])[0]
    assert [s.logprob for s in got] == pytest.approx(
        [by_hand(model, CONTEXTS[0], o) for o in OPTIONS], abs=1e-4)
