"""A GRPO step does no forward TRL would not: with num_iterations 1 and beta 0, the update's
one forward per micro-batch is the only full-sequence pass (no old-policy, no reference)."""

from __future__ import annotations

import pytest
import torch

from loratune.adapters import add_adapter
from loratune.config import LoraConfig, build_config
from loratune.train.rl_rewards import load_rewards
from loratune.train.rl_step import Prompt, grpo_step
from tiny import tiny_llama

REWARD = "def odd(prompts, completions, **kw):\n    return [len(c) % 2 for c in completions]\n"


def _full_passes(tmp_path, tok, **rl) -> tuple[int, int]:
    """(full-sequence forwards without grad, with grad) in one step on 2 prompts x 4 rows."""
    reward = tmp_path / "r.py"
    reward.write_text(REWARD)
    cfg = build_config({"train": {"objective": "grpo", "batch_size": 4, "grad_accum": 2,
                                  "rl": {"num_generations": 4, "max_completion_length": 5,
                                         "rewards": [{"function": f"{reward}:odd"}], **rl}}})
    model = tiny_llama(vocab=len(tok))
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model.train()
    passes = []
    model.model.register_forward_hook(   # the decoder; rollout forwards run on a cache
        lambda mod, args, kwargs, out: passes.append(
            (kwargs.get("use_cache"), torch.is_grad_enabled())), with_kwargs=True)
    prompts = [Prompt(w, tok(w)["input_ids"], {}) for w in ("Say apple", "Name a river")]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    record, _ = grpo_step(model, tok, prompts, load_rewards(cfg.train.rl.rewards), cfg.train,
                          set(), 0, opt, lambda k: None)
    assert record["rows_updated"] == 8
    full = [grad for cached, grad in passes if not cached]
    return full.count(False), full.count(True)


@pytest.mark.parametrize("rl, want", [
    ({}, (0, 2)),                                  # 2 micro-batches, one update
    ({"num_iterations": 2}, (2, 4)),               # old-policy log-probs, two updates
    ({"beta": 0.1}, (2, 2)),                       # reference log-probs (adapter off)
])
def test_the_update_recomputes_nothing_trl_avoids(tmp_path, smol_tokenizer, rl, want):
    assert _full_passes(tmp_path, smol_tokenizer, dynamic_sampling=False, **rl) == want
