"""Rollouts of train.objective grpo on the serving engine's batch loop, on the live model.

The serving Engine owns a model it detaches into slot-stacked LoRA layers (serve/pool.py), so it
cannot share the model being trained. Rollouts use the engine's own batch pieces instead: a
SlotBatch (slot KV cache written in place; transformers' DynamicCache where the model cannot run
on slots, as the engine decides) prefills every prompt together, then decodes all running rows
one token per forward, finished rows leaving the batch. The adapter is the model's live one
(no copy, no merge, no sync): every row runs it, so the batch's adapter-slot selector is a
no-op here. Each row samples from its own generator seeded by (seed, step, row), so a step's
completions depend only on the weights and the step: a resumed run samples the same ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from loratune.models.modules import cache_keyword
from loratune.serve.dynamic_batch import DynamicBatch
from loratune.serve.sampling import next_token
from loratune.serve.slot_batch import SlotBatch
from loratune.serve.slot_cache import slot_cache_refusal
from loratune.serve.types import SamplingParams


class LiveAdapter:
    """The batch's adapter-slot selector (serve/multi_lora.RowSlots) for a model whose own
    adapter serves every row: nothing to select."""

    static = False
    generation = 0

    def set(self, slots: list[int], device: torch.device) -> None:
        pass

    def use(self, rows: torch.Tensor, uniform: int | None = None) -> None:
        pass


@dataclass
class _Prompt:
    prompt_ids: list[int]


@dataclass
class _Row:
    """What the batch reads of a running sequence."""

    request: _Prompt
    generator: torch.Generator
    slot: int = 0
    tokens: list[int] = field(default_factory=list)
    done: bool = False


def row_seed(seed: int, step: int, row: int) -> int:
    return (seed * 1_000_003 + step) * 65_537 + row


def make_batch(model: nn.Module, rows: int, columns: int):
    key = cache_keyword(model.forward) or "past_key_values"
    device = next(model.parameters()).device
    if slot_cache_refusal(model, columns) is None:
        return SlotBatch(model, key, LiveAdapter(), device, rows=rows, columns=columns)
    return DynamicBatch(model, key, LiveAdapter(), device)


@torch.no_grad()
def rollout(model: nn.Module, prompts: list[list[int]], eos: set[int], params: SamplingParams,
            seed: int, step: int) -> list[list[int]]:
    """One completion per prompt (token ids, the ending EOS included when it came)."""
    was_training = model.training
    model.eval()  # no dropout while sampling
    try:
        rows = [_Row(_Prompt(p), torch.Generator().manual_seed(row_seed(seed, step, i)))
                for i, p in enumerate(prompts)]
        batch = make_batch(model, len(rows), max(map(len, prompts)) + params.max_tokens + 1)
        running = list(rows)
        logits = batch.prefill(running)
        while running:
            for row, row_logits in zip(running, logits):
                token = next_token(row_logits, params, row.generator)
                row.tokens.append(token)
                row.done = token in eos or len(row.tokens) >= params.max_tokens
            keep = [i for i, r in enumerate(running) if not r.done]
            if len(keep) < len(running):
                order = batch.keep(keep)
                running = [running[i] for i in order]
            if running:
                logits = batch.decode(running)
        return [r.tokens for r in rows]
    finally:
        model.train(was_training)
