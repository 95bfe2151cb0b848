"""GRPO rollouts on the engine's batch pieces: the live adapter, seeded per (seed, step, row)."""

from __future__ import annotations

import torch

from loratune.adapters import add_adapter
from loratune.config import LoraConfig
from loratune.serve.types import SamplingParams
from loratune.train.rl_rollout import rollout
from tiny import randomize_lora, tiny_llama

PROMPTS = [[5, 9, 3], [7, 1, 2, 8, 4, 6], [11]]


def _model():
    model = tiny_llama(vocab=64)
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    return randomize_lora(model, scale=0.5).train()


@torch.no_grad()
def _greedy_alone(model, prompt, n, eos):
    ids = list(prompt)
    for _ in range(n):
        token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(token)
        if token in eos:
            break
    return ids[len(prompt):]


def test_greedy_rows_equal_each_prompt_alone_with_the_live_adapter():
    model = _model()
    eos = {63}
    got = rollout(model, PROMPTS, eos, SamplingParams(max_tokens=7, temperature=0.0), 0, 0)
    assert model.training  # put back as it was
    want = [_greedy_alone(model.eval(), p, 7, eos) for p in PROMPTS]
    assert got == want
    with torch.no_grad():  # the adapter is live: a changed B changes the rollout
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.mul_(-3)
    assert rollout(model, PROMPTS, eos, SamplingParams(max_tokens=7), 0, 0) != got


def test_finished_rows_leave_and_eos_is_kept():
    model = _model()
    first = rollout(model, PROMPTS, set(), SamplingParams(max_tokens=3), 0, 0)
    for ending in range(len(PROMPTS)):  # each row in turn ends at once; the others go on
        eos = {first[ending][0]}
        out = rollout(model, PROMPTS, eos, SamplingParams(max_tokens=6), 0, 0)
        assert out[ending] == first[ending][:1]
        assert out == [_greedy_alone(model.eval(), p, 6, eos) for p in PROMPTS]
        model.train()


def test_sampling_is_seeded_per_step_and_row():
    model = _model()
    params = SamplingParams(max_tokens=8, temperature=1.5, top_p=0.95)
    a = rollout(model, PROMPTS * 2, set(), params, seed=3, step=4)
    assert a == rollout(model, PROMPTS * 2, set(), params, seed=3, step=4)
    assert a != rollout(model, PROMPTS * 2, set(), params, seed=3, step=5)
    assert a[0] != a[3]  # the same prompt twice in a group: different samples
