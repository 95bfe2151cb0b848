"""The `federated:` section of a run config: `loratune federate` trains the run's adapter on
simulated clients (Flower) that each hold a share of data.train, and aggregates on a server."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from loratune.config.base import USER_PATH, _Section

PARTITION = re.compile(r"iid|column:[^:\s]+|dirichlet:[0-9.eE+-]+(:[^:\s]+)?")


class PrivacyOptions(_Section):
    """Client-level differential privacy (DP-FedAvg): each client's update clipped on the
    client, Gaussian noise added to the mean on the server, (ε, δ) reported per round."""

    clip: float = Field(gt=0, description="L2 bound of each client's update (its adapter minus "
                        "the one it received), enforced by Flower's fixedclipping_mod on the "
                        "client and checked by the server")
    noise_multiplier: float = Field(ge=0, description="noise std over the clip: the mean of n "
                                    "updates gets N(0, (noise_multiplier·clip/n)²) per value; "
                                    "0 adds none (and gives no guarantee)")
    delta: float = Field(1e-5, gt=0, lt=1, description="the δ at which ε is reported (RDP "
                         "accountant; below 1/clients is customary)")


class SecAggOptions(_Section):
    """Flower's SecAgg+: the server learns the sum of the clients' masked, quantized updates,
    never one of them."""

    max_weight: float = Field(1000.0, gt=0, description="the largest example count a client "
                              "may hold (its weight is examples/max_weight, quantized); a "
                              "client with more fails the round's protocol")
    clipping_range: float = Field(8.0, gt=0, description="each weighted adapter value is "
                                  "clipped to ±this before quantization")
    quantization_range: int = Field(2 ** 22, gt=1, description="integer levels over "
                                    "[-clipping_range, clipping_range] (the error per value "
                                    "and client is at most 2·clipping_range/quantization_range)")
    num_shares: int | float = Field(1.0, gt=0, description="key shares per client: a count, "
                                    "or a fraction of the round's clients")
    reconstruction_threshold: int | float = Field(
        0.7, gt=0, description="shares that recover a dropped client's masks: a count, or a "
        "fraction of num_shares (at least 2)")


class FederatedConfig(_Section):
    """Federated fine-tuning: rounds of local training on clients and aggregation on a server."""

    rounds: int = Field(3, gt=0, description="server rounds (each: send the global adapter, "
                        "train locally, aggregate)")
    clients: int = Field(2, gt=0, description="simulated clients (Flower SuperNodes)")
    clients_per_round: int | float = Field(
        1.0, gt=0, description="clients sampled each round: a fraction (float, at most 1.0) "
        "or a count (int)")
    local_steps: int | None = Field(10, gt=0, description="optimizer steps per client per "
                                    "round (train.batch_size, grad_accum, lr apply)")
    local_epochs: float | None = Field(None, gt=0, description="passes over the client's data "
                                       "per round instead of local_steps")
    aggregation: Literal["fedavg", "ffa", "fedsa", "svd"] = Field(
        "fedavg", description="fedavg: A and B averaged by examples (every method; not the "
        "mean of the products); ffa: A frozen at the shared init, B averaged (exact); fedsa: "
        "A averaged, B kept on each client; svd: mean of s·B·A per layer re-factored to rank "
        "adapter.r")
    partition: str = Field(
        "iid", description="how data.train is split: iid, column:<name> (one value per client "
        "group, e.g. column:language), dirichlet:<alpha> (client sizes ~ Dir(alpha)) or "
        "dirichlet:<alpha>:<column> (each value's records split by Dir(alpha))")
    client_data: list[str] | None = Field(
        None, description="one training file per client instead of a partition of data.train",
        json_schema_extra=USER_PATH)
    seed: int | None = Field(None, description="partition and client sampling seed (default "
                             "train.seed)")
    min_clients: int = Field(1, gt=0, description="accepted updates a round needs; fewer "
                             "(dropped or refused clients) is an error")
    round_timeout: float = Field(600.0, gt=0, description="seconds the server waits for a "
                                 "round's replies; clients later than that are dropped")
    secagg: SecAggOptions | None = Field(None, description="secure aggregation (Flower's "
                                         "SecAgg+; {} for its defaults): the server sees only "
                                         "the sum; needs at least 2 clients per round")
    privacy: PrivacyOptions | None = Field(None, description="differential privacy: clip, "
                                           "noise_multiplier, delta (every client weighs the "
                                           "same then)")

    @field_validator("partition")
    @classmethod
    def _partition(cls, v: str) -> str:
        if not PARTITION.fullmatch(v):
            raise ValueError(f"{v!r}: expected iid, column:<name>, dirichlet:<alpha> or "
                             "dirichlet:<alpha>:<column>")
        if v.startswith("dirichlet:") and not float(v.split(":")[1]) > 0:
            raise ValueError(f"{v!r}: the Dirichlet alpha must be > 0")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> FederatedConfig:
        if (self.local_steps is None) == (self.local_epochs is None):
            raise ValueError("federated: give local_steps or local_epochs (set the other to "
                             "null)")
        if isinstance(self.clients_per_round, float) and self.clients_per_round > 1.0:
            raise ValueError(f"federated.clients_per_round: {self.clients_per_round} as a "
                             "fraction must be at most 1.0 (write an int for a count)")
        if self.min_clients > self.per_round():
            raise ValueError(f"federated.min_clients: {self.min_clients} is more than the "
                             f"{self.per_round()} clients sampled per round (clients_per_round)")
        if self.client_data is not None and len(self.client_data) != self.clients:
            raise ValueError(f"federated.client_data: {len(self.client_data)} files for "
                             f"{self.clients} clients; give one per client")
        if self.secagg is not None and self.aggregation == "svd":
            raise ValueError("federated.secagg: the svd aggregation needs each client's "
                             "factors, which SecAgg+ hides; use fedavg, ffa or fedsa")
        if self.secagg is not None and self.per_round() < 2:
            raise ValueError("federated.secagg: SecAgg+ needs at least 2 clients per round "
                             "(clients, clients_per_round)")
        if self.privacy is not None and self.aggregation == "svd":
            raise ValueError("federated.privacy: the svd aggregation re-factors products, so a "
                             "client's clipped update does not bound its effect; use fedavg, "
                             "ffa or fedsa")
        return self

    def per_round(self) -> int:
        """Clients sampled each round (at least one)."""
        if isinstance(self.clients_per_round, int):
            return min(self.clients_per_round, self.clients)
        return max(1, round(self.clients_per_round * self.clients))
