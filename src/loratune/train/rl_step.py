"""One step of train.objective grpo: sample a group of completions per prompt, score them,
turn rewards into advantages, then update the adapter num_iterations times on them.

The step's prompts are `batch_size x grad_accum / num_generations` data rows; each micro-batch
holds whole groups. Rollout and update time are measured apart.

Under torchrun (a RankShare) each rank samples and scores its own prompts, as rows of the step
(their global ids seed the sampling); rewards are gathered so advantages and metrics see the
whole step; the update divides by the step's global rows / tokens and sums gradients.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from loratune.adapters.registry import TrainingHooks
from loratune.config import RlConfig, TrainConfig
from loratune.train.distributed import RankShare
from loratune.serve.types import SamplingParams
from loratune.train.rl_batch import (RolloutBatch, completion_logps, micro_batch_loss, pad_rows,
                                     reference_logps)
from loratune.train.rl_loss import (LossSpec, group_advantages, nanstd, overlong_penalty,
                                    summed_rewards, zero_variance_groups)
from loratune.train.rl_rewards import Reward, score, text_of
from loratune.train.stop_points import begin_step, stop_point
from loratune.train.rl_rollout import rollout


@dataclass
class Prompt:
    """A data row: its prompt as the rewards see it, its token ids, its other columns."""

    prompt: str | list
    ids: list[int]
    columns: dict


@dataclass
class Scored:
    batch: RolloutBatch
    per_func: torch.Tensor      # (N, F)
    rewards: torch.Tensor       # (N,) weighted sum (+ overlong shaping)
    zero_std: torch.Tensor      # (N,) bool
    texts: list[str]
    lengths: torch.Tensor | None = None    # (N,) completion lengths


def gathered(scored: Scored, share: RankShare) -> tuple[Scored, torch.Tensor]:
    """(rewards and lengths, advantages) of the whole step (every rank's rows), for metrics;
    the batch and texts stay this rank's."""
    adv = share.gather(scored.batch.advantages.float().cpu())
    if not share.info.enabled:
        return scored, adv
    return Scored(scored.batch, share.gather(scored.per_func), share.gather(scored.rewards),
                  share.gather(scored.zero_std.float()).bool(), scored.texts,
                  share.gather(scored.lengths)), adv


def loss_spec(rl: RlConfig) -> LossSpec:
    low, high = rl.epsilons()
    return LossSpec(rl.loss, low, high, rl.beta, rl.max_completion_length, rl.kl_correction)


def sampling(rl: RlConfig) -> SamplingParams:
    return SamplingParams(max_tokens=rl.max_completion_length, temperature=rl.temperature,
                          top_p=rl.top_p)


def sample_and_score(model: nn.Module, tokenizer, prompts: list[Prompt], rewards: list[Reward],
                     cfg: TrainConfig, eos: set[int], step: int,
                     share: RankShare = RankShare()) -> Scored:
    rl, group = cfg.rl, cfg.rl.num_generations
    rows = [p for p in prompts for _ in range(group)]
    completions = rollout(model, [p.ids for p in rows], eos, sampling(rl), cfg.seed, step,
                          global_rows(len(rows), cfg.batch_size, share))
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    shown = [[{"role": "assistant", "content": t}] if isinstance(p.prompt, list) else t
             for p, t in zip(rows, texts)]
    columns = {k: [p.columns.get(k) for p in rows] for k in rows[0].columns}
    per_func = score(rewards, [p.prompt for p in rows], shown,
                     {**columns, "completion_ids": completions})
    weights = torch.tensor([r.weight for r in rewards])
    total = summed_rewards(per_func, weights)
    lengths = torch.tensor([len(c) for c in completions])
    total = total + overlong_penalty(lengths, rl.max_completion_length, rl.overlong_buffer,
                                     rl.overlong_penalty)
    # scale_rewards batch needs the whole step's std: every rank's rewards, then my block
    adv, zero = (share.mine(t) for t in group_advantages(share.gather(total), group,
                                                          rl.scale_rewards))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    p_ids, p_mask = pad_rows([p.ids for p in rows], pad, left=True)
    c_ids, c_mask = pad_rows(completions, pad, left=False)
    device = next(model.parameters()).device
    batch = RolloutBatch(p_ids.to(device), p_mask.to(device), c_ids.to(device),
                         c_mask.to(device), adv.to(device))
    return Scored(batch, per_func, total, zero, texts, lengths)


def global_rows(n: int, batch_size: int, share: RankShare) -> list[int]:
    """The step's row ids of this rank's n rows: its micro-batches are k % world == rank."""
    world, rank = share.info.world_size, share.info.rank
    return [(rank + (i // batch_size) * world) * batch_size + i % batch_size for i in range(n)]


def kept_rows(scored: Scored, rl: RlConfig) -> torch.Tensor:
    """Row indices that enter the update: all, or (dynamic sampling) those of groups whose
    rewards differ."""
    if not rl.dynamic_sampling:
        return torch.arange(len(scored.batch))
    flat = zero_variance_groups(scored.rewards.nan_to_num(0.0), rl.num_generations)
    return torch.nonzero(~flat)[:, 0]


@torch.no_grad()
def add_old_and_ref(model: nn.Module, batch: RolloutBatch, rl: RlConfig, chunk: int) -> None:
    """Old-policy log-probs (mu > 1) and reference log-probs (beta > 0), in chunks of rows."""
    parts = [batch.rows(slice(i, i + chunk)) for i in range(0, len(batch), chunk)]
    if not parts:   # this rank kept no group (dynamic sampling); others did
        return
    was = model.training
    model.eval()
    try:
        if rl.num_iterations > 1:
            batch.old_logps = torch.cat([completion_logps(model, p, rl.temperature)
                                         for p in parts])
        if rl.beta:
            batch.ref_logps = torch.cat([reference_logps(model, p, rl.temperature)
                                         for p in parts])
    finally:
        model.train(was)


def update(model: nn.Module, batch: RolloutBatch, cfg: TrainConfig, spec: LossSpec,
           optimizer: torch.optim.Optimizer, hooks: TrainingHooks = TrainingHooks(),
           number: int = 1, share: RankShare = RankShare()) -> tuple[float, dict[str, float]]:
    """Optimizer step `number` (1-based, over the run) over `batch` in micro-batches of
    train.batch_size rows, with the adapter method's own terms (MoE-LoRA's balance loss per
    micro-batch, AdaLoRA's orthogonality loss and rank budget per step) as SFT has them.
    Normalisers span the step on every rank (its rows, tokens, micro-batches): the gradients
    summed over ranks are then the one-process gradient."""
    size = cfg.batch_size
    micro = [batch.rows(slice(i, i + size)) for i in range(0, len(batch), size)]
    rows, tokens, n_micro = share.sum([len(batch), float(batch.completion_mask.sum()),
                                       len(micro)])
    total, sums = 0.0, {"clip_low_sum": 0.0, "clip_high_sum": 0.0, "kl_sum": 0.0, "tokens": 0.0}
    for part in micro:
        # the step's rows / this micro-batch's (= grad_accum when the parts are equal, as
        # TRL's; a shorter last part, after dynamic sampling, weighs by its rows)
        loss, stats = micro_batch_loss(model, part, spec, cfg.rl.temperature, rows / len(part),
                                       tokens)
        extra = hooks.micro_loss()
        (loss if extra is None else loss + extra / n_micro).backward()
        stop_point("update")    # a test's kill -9 lands here (train/stop_points.py)
        total += float(loss.detach())
        for k, v in stats.items():
            sums[k] += float(v)
    extra = hooks.step_loss()
    if extra is not None:  # the same on every rank: its gradients are summed world times
        (extra / share.info.world_size).backward()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    share.sum_gradients(params)
    total, *summed = share.sum([total, *sums.values()])
    sums = dict(zip(sums, summed))
    norm = None
    if cfg.max_grad_norm:
        norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
    optimizer.step()
    hooks.after_step(number)
    optimizer.zero_grad(set_to_none=True)
    return total, {**sums, "grad_norm": norm}


def step_metrics(scored: Scored, adv: torch.Tensor, rewards: list[Reward], updates: list,
                 kept: int, seconds: dict[str, float]) -> dict:
    """metrics.jsonl's record of a step: rewards per function (keys carry its name),
    advantages, KL, clip fractions, completion lengths, zero-variance share, timings."""
    out = {}
    for j, r in enumerate(rewards):
        col = scored.per_func[:, j]
        out[f"reward/{r.name}/mean"] = _num(torch.nanmean(col))
        out[f"reward/{r.name}/std"] = _num(nanstd(col))
    lengths = scored.lengths.float()
    stats = updates[-1][1]
    tokens = max(stats["tokens"], 1.0)
    out.update({
        "loss": sum(u[0] for u in updates) / len(updates),
        "reward": _num(torch.nanmean(scored.rewards)), "reward_std": _num(nanstd(scored.rewards)),
        "advantage_mean": float(adv.mean()), "advantage_std": float(adv.std()),
        "advantage_abs_max": float(adv.abs().max()),
        "zero_std_fraction": float(scored.zero_std.float().mean()),
        "completion_length": float(lengths.mean()), "completion_length_max": float(lengths.max()),
        "clip_low_fraction": stats["clip_low_sum"] / tokens,
        "clip_high_fraction": stats["clip_high_sum"] / tokens,
        "kl": stats["kl_sum"] / tokens, "rows_updated": kept,
        "grad_norm": stats["grad_norm"],
        "rollout_seconds": round(seconds["rollout"], 4),
        "update_seconds": round(seconds["update"], 4),
        "rollout_tokens_per_s": round(float(lengths.sum()) / max(seconds["rollout"], 1e-9), 1),
    })
    return out


def _num(x: torch.Tensor) -> float | None:
    v = float(x)
    return None if math.isnan(v) else v


def grpo_step(model: nn.Module, tokenizer, prompts: list[Prompt], rewards: list[Reward],
              cfg: TrainConfig, eos: set[int], step: int, optimizer, set_lr,
              hooks: TrainingHooks = TrainingHooks(),
              share: RankShare = RankShare()) -> tuple[dict, Scored]:
    """Rollout, score, num_iterations updates; (metrics record of the whole step, what this
    rank sampled)."""
    begin_step(step + 1)
    start = time.perf_counter()
    scored = sample_and_score(model, tokenizer, prompts, rewards, cfg, eos, step, share)
    rollout_s = time.perf_counter() - start
    keep = kept_rows(scored, cfg.rl)
    kept = int(share.sum([len(keep)])[0])
    updates = []
    if kept:
        batch = scored.batch.rows(keep)
        add_old_and_ref(model, batch, cfg.rl, cfg.batch_size)
        spec = loss_spec(cfg.rl)
        for it in range(cfg.rl.num_iterations):
            number = step * cfg.rl.num_iterations + it
            set_lr(number)
            updates.append(update(model, batch, cfg, spec, optimizer, hooks, number + 1, share))
    else:  # every group flat: nothing to learn from this rollout
        updates.append((0.0, {"clip_low_sum": 0.0, "clip_high_sum": 0.0, "kl_sum": 0.0,
                              "tokens": 0.0, "grad_norm": None}))
    seconds = {"rollout": rollout_s, "update": time.perf_counter() - start - rollout_s}
    return step_metrics(*gathered(scored, share), rewards, updates, kept, seconds), scored


def sample_lines(scored: Scored, prompts_text: list[str], step: int, n: int,
                 names: list[str]) -> list[dict]:
    """The first n completions with their rewards (by function name), for completions.jsonl /
    the dashboard."""
    return [{"step": step, "prompt": prompts_text[i], "completion": scored.texts[i],
             "reward": _num(scored.rewards[i]),
             "rewards": {name: _num(v) for name, v in zip(names, scored.per_func[i])},
             "advantage": float(scored.batch.advantages[i])}
            for i in range(min(n, len(scored.texts)))]


__all__ = ["Prompt", "grpo_step", "sample_lines", "text_of"]
