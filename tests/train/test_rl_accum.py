"""Gradient accumulation in the GRPO update (train/rl_step.update), in fp32 on a tiny Llama.

A step's rows split into micro-batches of train.batch_size must give the gradient of the whole
step in one batch, for every loss whose normaliser spans the step: grpo/gspo (mean over
sequences), dr_grpo (rows x max_completion_length) and dapo (the step's tokens) — also when the
last micro-batch is shorter (dynamic sampling keeps any number of whole groups). bnpo averages
tokens per micro-batch, as TRL's does, so it is compared with TRL's accumulation only.
TRL's GRPOTrainer with gradient_accumulation_steps=2 is the oracle for all five (its
generation batch split into two micro-batches as its _prepare_inputs does, unshuffled so both
sides see the same split).
"""

from __future__ import annotations

import pytest
import torch

from loratune.adapters.io import adapter_tensors
from loratune.config import TrainConfig
from loratune.train.rl_batch import reference_logps
from loratune.train.rl_loss import LossSpec, group_advantages
from loratune.train.rl_step import update
from test_rl_trl import (EPS, G, MAX_LEN, REWARDS, TEMPERATURE, _grads, _models, _our_batch,
                         _perturbed_logps, _rollouts, _trl_inputs, _trl_trainer)

BETA = 0.3
TOL = dict(atol=1e-6, rtol=1e-5)


class GradRecorder(torch.optim.Optimizer):
    """Keeps the gradients an update applies and leaves the weights as they are."""

    def __init__(self, named: dict[str, torch.Tensor]):
        self.names = list(named)
        super().__init__(list(named.values()), {})

    def step(self, closure=None):
        self.grads = {n: p.grad.clone() for n, p in zip(self.names, self.param_groups[0]["params"])}


def _setup(tmp_path, tok):
    prompts, rows, completions = _rollouts(tok)
    ours, theirs = _models(tmp_path, tok)
    adv, _ = group_advantages(torch.tensor(REWARDS), G, "group")
    batch = _our_batch(tok, rows, completions, adv)
    batch.ref_logps = reference_logps(ours, batch, TEMPERATURE)
    batch.old_logps = _perturbed_logps(ours, batch)  # ratios away from 1: the clip bites
    return rows, completions, ours, theirs, batch


def _our_grads(model, batch, loss: str, batch_size: int) -> dict[str, torch.Tensor]:
    cfg = TrainConfig(objective="grpo", batch_size=batch_size, max_grad_norm=1e9,
                      rl={"num_generations": 2, "temperature": TEMPERATURE, "loss": loss,
                          "rewards": [{"function": "exact_match"}]})
    spec = LossSpec(loss, *EPS[loss], BETA, MAX_LEN)
    recorder = GradRecorder(adapter_tensors(model, "default"))
    update(model, batch, cfg, spec, recorder)
    return recorder.grads


@pytest.mark.parametrize("micro", [4, 6])
@pytest.mark.parametrize("loss", ["grpo", "dr_grpo", "dapo", "gspo"])
def test_accumulated_micro_batches_equal_one_batch(tmp_path, smol_tokenizer, loss, micro):
    """8 rows in one micro-batch vs 4 + 4 (grad_accum 2, half the batch) and 6 + 2."""
    _, _, ours, _, batch = _setup(tmp_path, smol_tokenizer)
    whole = _our_grads(ours, batch, loss, len(batch))
    split = _our_grads(ours, batch, loss, micro)
    assert any(g.abs().max() > 1e-4 for g in whole.values())
    for key in whole:
        torch.testing.assert_close(split[key], whole[key], **TOL, msg=key)


@pytest.mark.parametrize("loss", ["grpo", "bnpo", "dr_grpo", "dapo", "gspo"])
def test_accumulation_matches_trl(tmp_path, smol_tokenizer, loss):
    from trl.trainer.utils import split_tensor_dict

    rows, completions, ours, theirs, batch = _setup(tmp_path, smol_tokenizer)
    trainer = _trl_trainer(tmp_path, smol_tokenizer, theirs, loss, BETA, 2, accum=2)
    inputs = _trl_inputs(trainer, smol_tokenizer, rows, completions, accum=2)
    inputs["old_per_token_logps"] = batch.old_logps.clone()
    for half in split_tensor_dict(inputs, 2):
        trainer._compute_loss(trainer.model, half).backward()
    theirs_g = _grads(theirs, True)
    mine = _our_grads(ours, batch, loss, len(batch) // 2)
    assert set(mine) == set(theirs_g) and mine
    for key in mine:
        torch.testing.assert_close(mine[key], theirs_g[key], atol=1e-5, rtol=1e-5, msg=key)
