"""Preference objectives: DPO, IPO, ORPO, SimPO and KTO on an adapter.

A micro-batch (data/preference_pairs.py) holds rows [chosen_1..B, rejected_1..B] (pairs) or
[completion_1..B, KL pair_1..B] (KTO). The policy is the model with its adapter; the reference
is the same model with the adapter switched off (or, with `adapter.init_from`, with the frozen
starting adapter active instead), run under no_grad — there is no second model. Reference
log-probs come from the batch when they were cached (`ref_logps`).

Each formula follows TRL's trainers (the tests check loss and gradients against them):
DPO `-log σ(β Δ)` (with label smoothing ε: `-(1-ε) log σ(β Δ) - ε log σ(-β Δ)`, conservative DPO),
Δ = (log π(c) - log π_ref(c)) - (log π(r) - log π_ref(r)); IPO `(Δ_c/|c| - Δ_r/|r| - 1/(2β))²`
(per-token, as TRL); SimPO `-log σ(β (avg log π(c) - avg log π(r)) - γ)`; ORPO
`NLL(chosen) - λ log σ(log odds(c) - log odds(r))` on mean token log-probs; KTO
`w_d (1 - σ(β (Δ_c - z)))` / `w_u (1 - σ(β (z - Δ_r)))` with z the batch's clamped KL estimate
from mismatched pairs. The loss of a micro-batch is its mean over pairs (examples for KTO).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from loratune.adapters import disable_adapters, set_active
from loratune.config import TrainConfig
from loratune.data.encode import IGNORE
from loratune.data.preference_pairs import PreferenceStats
from loratune.models.logprobs import next_token_logps

PAIRWISE = ("dpo", "ipo", "orpo", "simpo")
REFERENCE_FREE = ("orpo", "simpo")
REF_ADAPTER = "ref"  # the frozen copy of adapter.init_from, when the reference needs one


def needs_reference(objective: str) -> bool:
    return objective not in REFERENCE_FREE


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)),
                       torch.log(-torch.expm1(x)))


def smoothed_sigmoid_loss(z: torch.Tensor, smoothing: float) -> torch.Tensor:
    return -(1 - smoothing) * F.logsigmoid(z) - smoothing * F.logsigmoid(-z)


def identical_pairs_warning(stats: PreferenceStats, path: str, objective: str) -> str | None:
    """What to tell before training when some pairs' chosen and rejected answers are the same
    tokens: a pairwise preference term has no gradient on them, and KTO gets one completion
    labelled both desirable and undesirable. None when there are none."""
    if not stats.n_identical:
        return None
    why = ("KTO gets each answer as both desirable and undesirable" if objective == "kto" else
           f"{objective}'s preference term learns nothing from them")
    return (f"warning: {stats.n_identical} of {stats.n_pairs} pairs in {path} have chosen == "
            f"rejected (the same answer tokens, after data.max_length); {why}. Fix or drop them")


# ----------------------------------------------------------------------------- formulas


def pair_losses(objective: str, cfg: TrainConfig, logps: torch.Tensor, counts: torch.Tensor,
                ref: torch.Tensor | None,
                nll: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, chosen rewards, rejected rewards) of B pairs.

    logps/counts: (2, B) summed completion log-probs and token counts (chosen, rejected);
    ref: (2, B) reference sums (DPO, IPO); nll: ORPO's chosen NLL (a scalar)."""
    opts = cfg.preference
    if objective in ("dpo", "ipo"):
        beta = opts.beta_for(objective)
        ratios = logps - ref
        rewards = beta * ratios.detach()
        if objective == "dpo":
            losses = smoothed_sigmoid_loss(beta * (ratios[0] - ratios[1]), opts.label_smoothing)
        else:
            per_token = ratios / counts.clamp(min=1)
            losses = (per_token[0] - per_token[1] - 1 / (2 * beta)) ** 2
        return losses.mean(), rewards[0], rewards[1]
    mean = logps / counts.clamp(min=1)
    if objective == "simpo":
        beta = opts.beta_for("simpo")
        z = beta * (mean[0] - mean[1]) - opts.simpo_gamma
        rewards = beta * mean.detach()
        return smoothed_sigmoid_loss(z, opts.label_smoothing).mean(), rewards[0], rewards[1]
    if objective == "orpo":
        log_odds = (mean[0] - mean[1]) - (log1mexp(mean[0]) - log1mexp(mean[1]))
        rewards = opts.orpo_lambda * mean.detach()
        loss = nll - opts.orpo_lambda * F.logsigmoid(log_odds).mean()
        return loss, rewards[0], rewards[1]
    raise ValueError(f"train.objective: {objective} is not a pairwise objective")


def kto_losses(cfg: TrainConfig, logps: torch.Tensor, ref: torch.Tensor, kl_logps: torch.Tensor,
               kl_ref: torch.Tensor, desirable: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(loss, rewards, kl) of B unpaired examples: logps/ref (B,) completion sums, kl_* (B,)
    the mismatched pairs' sums, desirable (B,) bool."""
    opts = cfg.preference
    beta = opts.beta_for("kto")
    kl = (kl_logps - kl_ref).mean().detach().clamp(min=0)
    ratios = logps - ref
    good = opts.desirable_weight * (1 - torch.sigmoid(beta * (ratios - kl)))
    bad = opts.undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratios)))
    # Desirable examples first, as TRL concatenates them; the mean does not depend on order.
    losses = torch.cat([good[desirable], bad[~desirable]])
    return losses.mean(), beta * ratios.detach(), kl


# ------------------------------------------------------------------------------ the loss


class Reference:
    """The reference policy: the model with its adapter off, or with the frozen starting
    adapter (`adapter.init_from`) active in place of the trained one."""

    def __init__(self, adapter: str | None = None, trained: str = "default"):
        self.adapter = adapter
        self.trained = trained

    @contextlib.contextmanager
    def __call__(self, model: nn.Module):
        if self.adapter is None:
            with disable_adapters(model):
                yield model
            return
        set_active(model, self.adapter)
        try:
            yield model
        finally:
            set_active(model, self.trained)


def completion_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(rows, L-1) True where the next token is a completion token."""
    return batch["labels"][:, 1:] != IGNORE


def row_sums(model: nn.Module, batch: dict, score: torch.Tensor, chunk: int,
             rows: slice = slice(None)) -> torch.Tensor:
    """Summed completion log-probs of `rows` of the batch."""
    logps = next_token_logps(model, batch["input_ids"][rows], batch["attention_mask"][rows],
                             score[rows], chunk)
    return logps.sum(-1)


MetricSums = dict[str, float]


class PreferenceLoss:
    """forward(model, batch, chunk) -> (summed loss, pairs): the loss callable the runtime
    wraps (like causal_lm_loss), plus running sums of the rewards for the metrics."""

    def __init__(self, cfg: TrainConfig, reference: Reference, train_on: str = "answers"):
        self.cfg = cfg
        self.objective = cfg.objective
        self.reference = reference
        self.train_on = train_on
        self.sums: MetricSums = self.empty()

    def empty(self) -> MetricSums:
        keys = ("n", "rewards_chosen", "rewards_rejected", "correct") if \
            self.objective in PAIRWISE else ("n", "n_desirable", "rewards_desirable",
                                             "n_undesirable", "rewards_undesirable", "kl",
                                             "batches")
        return dict.fromkeys(keys, 0.0)

    def units(self, batch: dict) -> int:
        """Pairs (KTO: examples) in the batch: the loss is a mean over them."""
        return len(batch["input_ids"]) // 2

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor],
                 chunk: int = 1024) -> tuple[torch.Tensor, int]:
        n = self.units(batch)
        if self.objective == "kto":
            loss = self._kto(model, batch, chunk, n)
        else:
            loss = self._pairs(model, batch, chunk, n)
        return loss * n, n

    def _reference_sums(self, model, batch, score, chunk, rows=slice(None)) -> torch.Tensor:
        if "ref_logps" in batch:  # cached: (B, 2) -> the rows' order
            ref = batch["ref_logps"].to(torch.float32).T.reshape(-1)
            return ref[rows]
        with torch.no_grad(), self.reference(model):
            return row_sums(model, batch, score, chunk, rows)

    def _pairs(self, model, batch, chunk, n) -> torch.Tensor:
        comp = completion_mask(batch)
        score, nll = comp, None
        if self.objective == "orpo":
            # ORPO's NLL term follows data.train_on: the chosen answers, or all their tokens
            # (TRL's choice: prompt and answer).
            nll_mask = torch.zeros_like(comp)
            nll_mask[:n] = comp[:n] if self.train_on == "answers" else \
                batch["attention_mask"][:n, 1:].bool()
            score = comp | nll_mask
        logps = next_token_logps(model, batch["input_ids"], batch["attention_mask"], score, chunk)
        sums = (logps * comp).sum(-1).view(2, n)
        counts = comp.sum(-1).view(2, n)
        if self.objective == "orpo":
            nll = -(logps * nll_mask).sum() / nll_mask.sum().clamp(min=1)
        ref = None
        if needs_reference(self.objective):
            ref = self._reference_sums(model, batch, comp, chunk).view(2, n)
        loss, chosen, rejected = pair_losses(self.objective, self.cfg, sums, counts, ref, nll)
        self._add(n=n, rewards_chosen=chosen.sum(), rewards_rejected=rejected.sum(),
                  correct=(chosen > rejected).sum())
        return loss

    def _kto(self, model, batch, chunk, n) -> torch.Tensor:
        comp = completion_mask(batch)
        mine, kl_rows = slice(0, n), slice(n, 2 * n)
        logps = row_sums(model, batch, comp, chunk, mine)
        with torch.no_grad():  # the KL estimate carries no gradient (as in TRL)
            kl_logps = row_sums(model, batch, comp, chunk, kl_rows)
        ref = self._reference_sums(model, batch, comp, chunk)
        desirable = batch["desirable"].to(logps.device)
        loss, rewards, kl = kto_losses(self.cfg, logps, ref[mine], kl_logps, ref[kl_rows],
                                       desirable)
        self._add(n=n, n_desirable=desirable.sum(), rewards_desirable=rewards[desirable].sum(),
                  n_undesirable=(~desirable).sum(), rewards_undesirable=rewards[~desirable].sum(),
                  kl=kl, batches=1)
        return loss

    def _add(self, **values) -> None:
        for k, v in values.items():
            self.sums[k] += float(v)

    def take_metrics(self, total: Callable[[list[float]], list[float]],
                     prefix: str = "") -> dict[str, float]:
        """The means since the last call (summed over processes by `total`), then reset."""
        sums = dict(zip(self.sums, total(list(self.sums.values()))))
        self.sums = self.empty()
        return {prefix + k: round(v, 6) for k, v in preference_means(sums).items()}


def preference_means(sums: MetricSums) -> dict[str, float]:
    """rewards_chosen, rewards_rejected, margin, accuracy (KTO: kl instead of accuracy)."""
    if not sums.get("n"):
        return {}
    if "correct" in sums:
        chosen, rejected = sums["rewards_chosen"] / sums["n"], sums["rewards_rejected"] / sums["n"]
        return {"rewards_chosen": chosen, "rewards_rejected": rejected,
                "margin": chosen - rejected, "accuracy": sums["correct"] / sums["n"]}
    out = {"kl": sums["kl"] / max(sums["batches"], 1)}
    if sums["n_desirable"]:
        out["rewards_chosen"] = sums["rewards_desirable"] / sums["n_desirable"]
    if sums["n_undesirable"]:
        out["rewards_rejected"] = sums["rewards_undesirable"] / sums["n_undesirable"]
    if sums["n_desirable"] and sums["n_undesirable"]:
        out["margin"] = out["rewards_chosen"] - out["rewards_rejected"]
    return out
