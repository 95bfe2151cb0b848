"""The math of GRPO and its successors (train.objective grpo): advantages from group rewards,
and the clipped policy loss on completion tokens.

Formulas follow the papers as TRL's GRPOTrainer implements them (tests/train/test_rl_trl.py
checks loss and adapter gradients against it):

- ratio r = exp(log π(t) - log π_old(t)) per token; GSPO takes one ratio per sequence,
  exp(mean over its tokens of the log-ratio), so a sequence is clipped as a whole.
- per-token loss -min(r A, clip(r, 1-ε_low, 1+ε_high) A) (+ β KL, the k3 estimator
  exp(ref - logp) - (ref - logp) - 1, when beta > 0; by default times the ratio, as
  DeepSeek-V3.2 and TRL since 1.x do, which makes its gradient the unbiased reverse-KL one).
- normalisation: grpo/gspo average tokens per sequence then sequences; bnpo averages all
  tokens of the micro-batch; dr_grpo divides the token sum by rows x max_completion_length
  (no length bias); dapo divides by the completion tokens of the whole optimizer step.
  grpo/bnpo/dr_grpo/gspo are also divided by `accum`, the step's rows over the micro-batch's
  (the micro-batches per step when they are equal, TRL's gradient_accumulation_steps), so
  accumulated micro-batches sum to the step's loss, also when the last is shorter (dynamic
  sampling keeps any number of groups). bnpo stays a mean of per-micro-batch token means,
  as TRL's (tests/train/test_rl_accum.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SEQUENCE_LEVEL = ("gspo",)


@dataclass(frozen=True)
class LossSpec:
    loss: str
    epsilon_low: float
    epsilon_high: float
    beta: float
    max_completion_length: int
    kl_correction: bool = True


# ----------------------------------------------------------------------------- advantages


def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Standard deviation with Bessel's correction, NaNs left out (NaN below two values)."""
    keep = dict(dim=dim, keepdim=True) if dim is not None else {}
    mean = torch.nanmean(x, **keep)
    count = (~torch.isnan(x)).sum(**keep)
    var = torch.nanmean((x - mean) ** 2, **keep) * count / (count - 1)
    var = torch.where(count > 1, var, torch.full_like(var, float("nan")))
    out = var.sqrt()
    return out.squeeze(dim) if dim is not None else out.reshape(())


def summed_rewards(per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(N,) weighted sum over reward functions (N, F); a function's None (NaN) counts as
    absent, and a row no function scored stays NaN."""
    total = (per_func * weights[None]).nansum(1)
    return total.masked_fill(torch.isnan(per_func).all(1), float("nan"))


def group_advantages(rewards: torch.Tensor, group: int,
                     scale: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages (N,), zero-variance (N,) bool) of rewards laid out as consecutive groups.

    advantage = reward - its group's mean, divided by the group's std (`group`), the whole
    batch's (`batch`) or nothing (`none`, Dr. GRPO); a NaN reward gets advantage 0."""
    grouped = rewards.view(-1, group)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(group)
    if scale == "batch":
        std = nanstd(rewards).expand_as(rewards)
    else:
        std = nanstd(grouped, dim=1).repeat_interleave(group)
    adv = rewards - mean
    if scale != "none":
        adv = adv / (std + 1e-4)
    zero = torch.isclose(std, torch.zeros_like(std))
    return torch.nan_to_num(adv, nan=0.0), zero


def zero_variance_groups(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """(N,) True for every row of a group whose rewards are all equal (DAPO drops these)."""
    grouped = rewards.view(-1, group)
    flat = (grouped.amax(1) - grouped.amin(1)).abs() < 1e-12
    return flat.repeat_interleave(group)


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int,
                     penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment: 0 up to max_len - buffer, then falling linearly to
    -penalty at max_len."""
    if buffer <= 0:
        return torch.zeros(lengths.shape)
    over = (lengths.float() - (max_len - buffer)).clamp(min=0) / buffer
    return -penalty * over.clamp(max=1.0)


# ------------------------------------------------------------------------------ the loss


def log_importance(logps: torch.Tensor, old: torch.Tensor, mask: torch.Tensor,
                   sequence: bool) -> torch.Tensor:
    """log r: per token (B, T), or per sequence (B, 1) as the mean of its tokens' log-ratios."""
    log_ratio = logps - old
    if not sequence:
        return log_ratio
    return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)


def k3_kl(logps: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-token KL(π || π_ref) estimate exp(ref - logp) - (ref - logp) - 1 (never negative)."""
    diff = ref - logps
    return torch.exp(diff) - diff - 1


def normalise(per_token: torch.Tensor, mask: torch.Tensor, spec: LossSpec, accum: float,
              step_tokens: float) -> torch.Tensor:
    """The micro-batch's share of the step loss (see the module docstring)."""
    masked = per_token * mask
    if spec.loss in ("grpo", "gspo"):
        loss = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif spec.loss == "bnpo":
        loss = masked.sum() / mask.sum().clamp(min=1.0)
    elif spec.loss == "dr_grpo":
        loss = masked.sum() / (per_token.size(0) * spec.max_completion_length)
    elif spec.loss == "dapo":
        return masked.sum() / max(step_tokens, 1.0)
    else:
        raise ValueError(f"train.rl.loss: {spec.loss!r} is not one of grpo, bnpo, dr_grpo, "
                         "dapo, gspo")
    return loss / accum


def policy_loss(logps: torch.Tensor, old: torch.Tensor | None, ref: torch.Tensor | None,
                advantages: torch.Tensor, mask: torch.Tensor, spec: LossSpec, accum: float = 1,
                step_tokens: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, stats) of B completions: logps/old/ref (B, T) token log-probs (old None: the
    rollout's policy is this one, μ = 1), advantages (B,), mask (B, T) completion tokens.
    stats: masked sums and counts (kl, clipped low/high) for the step's metrics."""
    mask = mask.to(logps.dtype)
    old = logps.detach() if old is None else old
    adv = advantages.unsqueeze(1)
    ratio = torch.exp(log_importance(logps, old, mask, spec.loss in SEQUENCE_LEVEL))
    clipped = torch.clamp(ratio, 1 - spec.epsilon_low, 1 + spec.epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    stats = clip_stats(ratio.detach(), adv, mask, spec)
    if spec.beta:
        kl = k3_kl(logps, ref)
        if spec.kl_correction:  # DeepSeek-V3.2: weighted by the ratio, the unbiased gradient
            kl = kl * ratio
        per_token = per_token + spec.beta * kl
        stats["kl_sum"] = (kl.detach() * mask).sum()
    return normalise(per_token, mask, spec, accum, step_tokens), stats


def clip_stats(ratio: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
               spec: LossSpec) -> dict[str, torch.Tensor]:
    """Token counts where the clip took the gradient away: below 1-ε with A < 0, above 1+ε
    with A > 0 (a sequence-level ratio counts for each of its tokens)."""
    low = ((ratio < 1 - spec.epsilon_low) & (adv < 0)).expand_as(mask).to(mask.dtype)
    high = ((ratio > 1 + spec.epsilon_high) & (adv > 0)).expand_as(mask).to(mask.dtype)
    return {"clip_low_sum": (low * mask).sum(), "clip_high_sum": (high * mask).sum(),
            "tokens": mask.sum()}
