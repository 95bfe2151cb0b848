"""GRPO rollouts on the engine's batch pieces: the live adapter, seeded per (seed, step, row)."""

from __future__ import annotations

import torch

from loratune.adapters import add_adapter
from loratune.config import LoraConfig
from loratune.serve.dynamic_batch import DynamicBatch
from loratune.serve.types import SamplingParams
from loratune.train import rl_rollout
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


GROUPS = [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3 + [PROMPTS[2]] * 2


def test_a_group_prefills_its_prompt_once_and_each_row_is_its_own():
    model = _model()
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(
        lambda mod, args, out: seen.append(tuple(args[0].shape)))
    eos = {63}
    got = rollout(model, GROUPS, eos, SamplingParams(max_tokens=5, temperature=0.0), 0, 0)
    hook.remove()
    assert seen[0] == (3, 6)             # 3 distinct prompts prefilled, not 8 rows
    assert all(shape[1] == 1 for shape in seen[1:])
    assert got == [_greedy_alone(model.eval(), p, 5, eos) for p in GROUPS]
    sampled = rollout(model.train(), GROUPS, set(), SamplingParams(max_tokens=6,
                                                                   temperature=1.0), 0, 0)
    assert len({tuple(c) for c in sampled[:3]}) > 1   # one prompt, different samples


def test_the_dynamic_cache_path_samples_the_same(monkeypatch):
    model = _model()
    params = SamplingParams(max_tokens=6, temperature=1.2, top_p=0.9)
    first = rollout(model, GROUPS, set(), params, 0, 0)
    eos = {first[0][2], first[4][0]}      # rows end at different steps and leave the batch
    slots = rollout(model, GROUPS, eos, params, 5, 1)
    monkeypatch.setattr(rl_rollout, "slot_cache_refusal", lambda model, columns: "test")
    assert isinstance(rl_rollout.make_batch(model, 2, 10), DynamicBatch)
    assert rollout(model, GROUPS, eos, params, 5, 1) == slots
    assert any(len(c) < 6 for c in slots)
