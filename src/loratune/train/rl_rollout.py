"""Rollouts of train.objective grpo on the serving engine's batch loop, on the live model.

The serving Engine owns a model it detaches into slot-stacked LoRA layers (serve/pool.py), so it
cannot share the model being trained. Rollouts use the engine's own batch pieces instead: a
SlotBatch (slot KV cache written in place; transformers' DynamicCache where the model cannot run
on slots, as the engine decides) prefills each distinct prompt once (a group's rows then copy
its cache: fan_out), then decodes all running rows one token per forward, finished rows leaving
the batch. The adapter is the model's live one (no copy, no merge, no sync): every row runs it,
so the batch's adapter-slot selector is a no-op here. All rows' next tokens are one sampling op
(train/rl_sampling.py) seeded per (seed, step, row, token), and the step reads them back to the
host once; a step's completions depend only on the weights and the step, so a resumed run
samples the same ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from loratune.eval.loglik import can_reuse_cache
from loratune.models.modules import cache_keyword
from loratune.serve.dynamic_batch import DynamicBatch
from loratune.serve.slot_batch import SlotBatch
from loratune.serve.slot_cache import slot_cache_refusal
from loratune.serve.types import SamplingParams
from loratune.train.rl_sampling import sample_tokens, stream_key, uniforms
from loratune.train.stop_points import stop_point


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
    slot: int = 0
    tokens: list[int] = field(default_factory=list)
    lead = None          # no adapter's virtual tokens: the live model's adapter runs itself
    position_shift = 0   # text only: positions are columns (no multimodal RoPE offset)


def make_batch(model: nn.Module, rows: int, columns: int):
    key = cache_keyword(model.forward) or "past_key_values"
    device = next(model.parameters()).device
    # prompt/prefix adapters hook the KV cache themselves and read only transformers' own
    if can_reuse_cache(model) and slot_cache_refusal(model, columns) is None:
        return SlotBatch(model, key, LiveAdapter(), device, rows=rows, columns=columns)
    return DynamicBatch(model, key, LiveAdapter(), device)


@torch.no_grad()
def rollout(model: nn.Module, prompts: list[list[int]], eos: set[int], params: SamplingParams,
            seed: int, step: int, row_ids: list[int] | None = None) -> list[list[int]]:
    """One completion per prompt (token ids, the ending EOS included when it came); row i
    samples as row `row_ids[i]` of the step (default i: under torchrun, its global row)."""
    was_training = model.training
    model.eval()  # no dropout while sampling
    try:
        return _decode_all(model, prompts, eos, params, stream_key(seed, step), row_ids)
    finally:
        model.train(was_training)


def shared_prompts(prompts: list[list[int]]) -> tuple[list[int], list[int]]:
    """(the first row of each distinct prompt, each row's index among those distinct ones)."""
    index: dict[tuple[int, ...], int] = {}
    firsts, source = [], []
    for i, p in enumerate(prompts):
        if tuple(p) not in index:
            index[tuple(p)] = len(firsts)
            firsts.append(i)
        source.append(index[tuple(p)])
    return firsts, source


def fan_out(batch, source: list[int]) -> None:
    """Batch row i becomes a copy of prefilled row source[i]: the rows of a group share their
    prompt's cache. Done on the batch's own cache: the engine has no such call (its rows are
    distinct requests)."""
    if isinstance(batch, SlotBatch):
        columns = min(batch.longest, batch.cache.capacity)
        batch.cache.move(source, list(range(len(source))), columns)
        batch.size = len(source)
        return
    index = torch.tensor(source, device=batch.device)
    batch.cache.batch_select_indices(index)
    batch.mask = batch.mask.index_select(0, index)


def _decode_all(model: nn.Module, prompts: list[list[int]], eos: set[int],
                params: SamplingParams, key: int,
                row_ids: list[int] | None = None) -> list[list[int]]:
    rows = [_Row(_Prompt(p)) for p in prompts]
    batch = make_batch(model, len(rows), max(map(len, prompts)) + params.max_tokens + 1)
    firsts, source = shared_prompts(prompts)
    logits = batch.prefill([rows[i] for i in firsts])   # a group's prompt is prefilled once
    fan_out(batch, source)
    logits = logits[torch.tensor(source, device=logits.device)]
    ids = torch.tensor(row_ids if row_ids is not None else range(len(rows)),
                       dtype=torch.long, device=logits.device)  # each running row's own index
    stops = torch.tensor(sorted(eos), dtype=torch.long, device=logits.device)
    running = rows
    for t in range(params.max_tokens):
        tokens = sample_tokens(logits, params, uniforms(key, ids, t))
        ended = torch.isin(tokens, stops)
        picked, ended = tokens.tolist(), ended.tolist()       # the one sync of the step
        for row, token in zip(running, picked):
            row.tokens.append(token)
        stop_point("rollout")   # a test's kill -9 lands here (train/stop_points.py)
        keep = [i for i, end in enumerate(ended) if not end]
        if not keep or t + 1 == params.max_tokens:
            break
        if len(keep) < len(running):
            order = batch.keep(keep)
            running = [running[i] for i in order]
            ids = ids[torch.tensor(order, device=ids.device)]
        logits = batch.decode(running)
    return [r.tokens for r in rows]
