"""Server-side aggregation of client adapters: pure functions on state dicts (file key ->
tensor), no Flower in sight, so each rule is unit-tested on its own.

Why more than FedAvg: a LoRA update is the product ΔW = s·B·A. Averaging A and B separately
(FedAvg) gives mean(B)·mean(A), which is not mean(B·A) once clients differ. FFA-LoRA keeps A
frozen at one shared init, so the mean of B times that A is the mean product exactly; FedSA-LoRA
averages A and leaves each B with its client; the SVD rule averages the products themselves and
re-factors the mean into rank r (FlexLoRA), which also lets clients train different ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

A_SUFFIX, B_SUFFIX = "lora_A.weight", "lora_B.weight"
AGGREGATIONS = ("fedavg", "ffa", "fedsa", "svd")


@dataclass
class ClientUpdate:
    """One client's adapter after its local steps, and how much it counts."""

    state: dict[str, torch.Tensor]  # file key -> tensor (only the keys the client sends)
    weight: float  # training examples the client holds
    scales: dict[str, float] = field(default_factory=dict)  # layer prefix -> s of ΔW = s·B·A


def is_lora_a(key: str) -> bool:
    return key.endswith(A_SUFFIX)


def is_lora_b(key: str) -> bool:
    return key.endswith(B_SUFFIX)


def layer_prefix(key: str) -> str:
    """`...q_proj.lora_A.weight` -> `...q_proj.`"""
    return key[: -len(A_SUFFIX)] if is_lora_a(key) else key[: -len(B_SUFFIX)]


def weighted_mean(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Σ w_i·t_i / Σ w_i, summed in float32 (or wider) and returned in the first tensor's dtype."""
    total = float(sum(weights))
    acc = torch.zeros(tensors[0].shape, dtype=torch.promote_types(tensors[0].dtype,
                                                                    torch.float32))
    for t, w in zip(tensors, weights):
        acc += t.to(acc.dtype) * (w / total)
    return acc.to(tensors[0].dtype)


def fedavg(updates: list[ClientUpdate], keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor (or those of `keys`) averaged, weighted by the clients' examples."""
    weights = [u.weight for u in updates]
    names = keys if keys is not None else list(updates[0].state)
    return {k: weighted_mean([u.state[k] for u in updates], weights) for k in names}


def ffa(updates: list[ClientUpdate], global_state: dict[str, torch.Tensor]
        ) -> dict[str, torch.Tensor]:
    """FFA-LoRA: A stays the shared init (the clients trained it frozen), the rest averaged."""
    shared = [k for k in updates[0].state if not is_lora_a(k)]
    out = dict(global_state)
    out.update(fedavg(updates, shared))
    return out


def fedsa(updates: list[ClientUpdate], global_state: dict[str, torch.Tensor]
          ) -> dict[str, torch.Tensor]:
    """FedSA-LoRA: the clients send A (and any non-LoRA tensors), never B; those are averaged
    into the global adapter, whose B stays the init (each client keeps its own)."""
    sent = [k for k in updates[0].state if not is_lora_b(k)]
    out = dict(global_state)
    out.update(fedavg(updates, sent))
    return out


def mean_deltas(updates: list[ClientUpdate]) -> dict[str, torch.Tensor]:
    """Layer prefix -> the examples-weighted mean of the clients' s·B·A (float32)."""
    weights = [u.weight for u in updates]
    out = {}
    for key in updates[0].state:
        if is_lora_a(key):
            prefix = layer_prefix(key)
            deltas = [u.scales[prefix] * (u.state[prefix + B_SUFFIX].float()
                                          @ u.state[key].float()) for u in updates]
            out[prefix] = weighted_mean(deltas, weights)
    return out


def refactor(delta: torch.Tensor, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) of rank `rank` with scale·B·A the best rank-r approximation of `delta` (SVD,
    Eckart–Young); the singular values are split evenly between B and A."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    root = (s[:rank] / scale).sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def svd(updates: list[ClientUpdate], rank: int, scales: dict[str, float]
        ) -> dict[str, torch.Tensor]:
    """FlexLoRA-style: average each layer's ΔW (client ranks may differ), re-factor it into
    rank `rank` at the global adapter's `scales`; other tensors are averaged as in fedavg."""
    out = fedavg(updates, [k for k in updates[0].state
                           if not (is_lora_a(k) or is_lora_b(k))])
    dtype = next(t for k, t in updates[0].state.items() if is_lora_a(k)).dtype
    for prefix, delta in mean_deltas(updates).items():
        b, a = refactor(delta, rank, scales[prefix])
        # contiguous: the SVD's factors are strided views, and safetensors writes dense tensors
        out[prefix + B_SUFFIX] = b.to(dtype).contiguous()
        out[prefix + A_SUFFIX] = a.to(dtype).contiguous()
    return out


def aggregate(rule: str, updates: list[ClientUpdate], global_state: dict[str, torch.Tensor],
              rank: int | None = None, scales: dict[str, float] | None = None
              ) -> dict[str, torch.Tensor]:
    """The next global adapter by `rule` (federated.aggregation)."""
    if rule == "fedavg":
        return {**global_state, **fedavg(updates)}
    if rule == "ffa":
        return ffa(updates, global_state)
    if rule == "fedsa":
        return fedsa(updates, global_state)
    if rule == "svd":
        return {**global_state, **svd(updates, rank, scales)}
    raise ValueError(f"federated.aggregation: {rule!r}; expected one of {', '.join(AGGREGATIONS)}")


def exchanged_keys(rule: str, keys: list[str]) -> list[str]:
    """The keys server and clients send each other under `rule`: FedSA keeps B at home, FFA's
    A never changes (every side has it from the shared init)."""
    return [k for k in keys if not ((rule == "fedsa" and is_lora_b(k))
                                    or (rule == "ffa" and is_lora_a(k)))]
