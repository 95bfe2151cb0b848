"""Client-level differential privacy (DP-FedAvg, McMahan et al. 2018) from Flower's pieces:
each client's update (its adapter minus the one it received) is clipped to L2 norm `clip` on
the client by Flower's `fixedclipping_mod`, the server checks the bound, averages the updates
with equal weights (so one client moves the mean by at most clip/n) and adds Gaussian noise of
std noise_multiplier·clip/n to the mean, as Flower's DifferentialPrivacyClientSideFixedClipping
does; Flower's RDP accountant (Google's dp-accounting) turns the rounds so far into (ε, δ).

The noise comes from a generator seeded by the operating system, never by the run's seed:
noise anyone could regenerate from the config would protect nothing (so a resumed private run
is not bit-equal to an uninterrupted one; its accounting is).
"""

from __future__ import annotations

import math

import torch
from flwr.app import Context, Message, MessageType
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, compute_stdv
from flwr.supercore.privacy_accounting import (GaussianPrivacyEvent, NeighboringRelation,
                                               PrivacyConfig, SamplingMethod)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from loratune.config import RunConfig
from loratune.config.federated import PrivacyOptions

# A float32 update clipped to exactly `clip` can measure a few ulps above it.
NORM_SLACK = 1e-4


def client_mods(cfg: RunConfig) -> list:
    """The Flower client mods the run's privacy needs (none without federated.privacy)."""
    return [clip_train_replies] if cfg.federated.privacy is not None else []


def clip_train_replies(msg: Message, context: Context, call_next) -> Message:
    """fixedclipping_mod on train messages only: it does not look at the type, and refuses
    the server's query (which carries no arrays) with an error."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    # Under SecAgg+ the message also holds its protocol record; fixedclipping_mod wants one.
    others = {k: r for k, r in msg.content.config_records.items() if k != "config"}
    for key in others:
        del msg.content[key]
    try:
        return fixedclipping_mod(msg, context, call_next)
    finally:
        for key, record in others.items():
            msg.content[key] = record


def round_config(cfg: RunConfig) -> dict[str, float]:
    """What the server adds to each round's config: the clip fixedclipping_mod reads."""
    privacy = cfg.federated.privacy
    return {KEY_CLIPPING_NORM: privacy.clip} if privacy is not None else {}


def update_norm(update: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> float:
    """L2 norm of the whole update (every sent tensor minus the one received), as Flower's
    clipping measures it."""
    total = sum(float((update[k].double() - start[k].double()).pow(2).sum()) for k in start)
    return math.sqrt(total)


def norm_refusal(clip: float, update: dict[str, torch.Tensor],
                 start: dict[str, torch.Tensor]) -> str | None:
    norm = update_norm(update, start)
    if norm > clip * (1 + NORM_SLACK):
        return (f"update norm {norm:.6g} exceeds federated.privacy.clip {clip:g} (a client "
                "without fixedclipping_mod?)")
    return None


class Ledger:
    """The server's side of DP: noise on each round's mean and the (ε, δ) spent so far."""

    def __init__(self, privacy: PrivacyOptions, population: int):
        self.privacy = privacy
        self.population = population
        self.accountant = None
        if privacy.noise_multiplier > 0:  # no noise: nothing to account, ε is infinite
            self.accountant = RdpAccountant(PrivacyConfig(
                target_delta=privacy.delta, population_size=population,
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                # Every sampled client counts, whoever was sampled: no amplification claimed.
                sampling_method=SamplingMethod.NO_AMPLIFICATION))

    def spend(self, accepted: int) -> dict:
        """Account one release, the mean of `accepted` updates; the round's privacy line."""
        std = compute_stdv(self.privacy.noise_multiplier, self.privacy.clip, accepted)
        epsilon = None
        if self.accountant is not None:
            self.accountant.compose(GaussianPrivacyEvent(self.privacy.noise_multiplier,
                                                         accepted, self.population))
            epsilon = round(self.accountant.get_privacy_spent().epsilon, 6)
        return {"epsilon": epsilon, "delta": self.privacy.delta, "clip": self.privacy.clip,
                "noise_multiplier": self.privacy.noise_multiplier, "noise_std": std}

    def replay(self, records: list[dict]) -> None:
        """The rounds a resumed run already released, accounted again."""
        for record in records:
            self.spend(len(record["accepted"]))

    def release(self, state: dict[str, torch.Tensor], keys: list[str],
                accepted: int) -> tuple[dict[str, torch.Tensor], dict]:
        """The round's mean with its noise (on the aggregated `keys`) and its privacy line."""
        line = self.spend(accepted)
        if line["noise_std"] > 0:
            gen = torch.Generator()
            gen.seed()  # from the operating system (see the module's docstring)
            state = dict(state)
            for k in keys:
                noise = torch.randn(state[k].shape, generator=gen, dtype=torch.float64)
                state[k] = (state[k].double() + noise * line["noise_std"]).to(state[k].dtype)
        return state, line
