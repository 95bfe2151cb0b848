"""One client's round: the global adapter in, `local_steps` of loratune's own training step on
the client's file, the adapter (only the tensors the aggregation wants) out.

The steps are train/loop.py's `train_step` on a `Run` built here: the same batches, optimizer,
schedule and clipping as `loratune train`. Round r runs global steps (r-1)·n .. r·n-1 of the
client's batch stream and of a schedule over rounds·n steps, with a fresh optimizer each round
(its moments never leave the client), so one client, one round equals a plain run of n steps.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from loratune.adapters.io import adapter_state_dict
from loratune.adapters.io import copy_adapter_weights, save_adapter
from loratune.adapters.registry import AdapterError
from loratune.config import RunConfig
from loratune.files import write_atomic_file
from loratune.federated.aggregate import exchanged_keys, is_lora_b
from loratune.federated.base import AdaptedBase
from loratune.readers import read_safetensors
from loratune.train.loop import Run, Totals, TrainData, setup_data, train_step
from loratune.train.method_hooks import method_hooks
from loratune.train.metrics_log import MetricsLog
from loratune.train.objectives import training_objective
from loratune.train.optim import build_optimizer
from loratune.train.runtime import OneProcess

_DATA: dict[str, TrainData] = {}  # client file -> its encoded batches, read once per process


@dataclass
class LocalResult:
    update: dict[str, torch.Tensor]  # the tensors sent back
    examples: int
    loss: float  # mean loss of the round's steps
    steps: int


def client_data(cfg: RunConfig, base: AdaptedBase, path: str) -> TrainData:
    if path not in _DATA:
        local = cfg.model_copy(update={"data": cfg.data.model_copy(
            update={"train": path, "eval": None, "eval_fraction": 0.0})})
        _DATA[path] = setup_data(local, base.tokenizer, (path, None), _silent)
    return _DATA[path]


def steps_per_round(cfg: RunConfig, data: TrainData) -> int:
    fed = cfg.federated
    if fed.local_steps is not None:
        return fed.local_steps
    return max(1, math.ceil(fed.local_epochs * max(1, data.n_batches // cfg.train.grad_accum)))


def start_weights(cfg: RunConfig, base: AdaptedBase, received: dict[str, torch.Tensor],
                  local_dir: Path, rnd: int) -> dict[str, torch.Tensor]:
    """The adapter this round starts from: the init, overlaid by this client's own B of its
    last round (FedSA) and by what the server sent."""
    weights = dict(base.init)
    if cfg.federated.aggregation == "fedsa":
        kept = last_local(local_dir, rnd)
        if kept is not None:
            weights.update(read_safetensors(kept))
    weights.update(received)
    return weights


def last_local(local_dir: Path, rnd: int) -> Path | None:
    """This client's newest kept-at-home tensors from a round before `rnd`."""
    found = sorted(p for p in local_dir.glob("round-*.safetensors")
                   if re.fullmatch(r"round-\d{4}\.safetensors", p.name)
                   and int(p.name[6:10]) < rnd)
    return found[-1] if found else None


def local_train(cfg: RunConfig, base: AdaptedBase, path: str, received: dict[str, torch.Tensor],
                rnd: int, local_dir: Path) -> LocalResult:
    """Round `rnd` (1-based) of this client."""
    model = base.model
    try:
        copy_adapter_weights(model, "default", start_weights(cfg, base, received, local_dir, rnd),
                             Path(f"round {rnd}: the server's adapter"))
    except AdapterError as err:
        raise ValueError(str(err)) from None
    freeze_a = cfg.federated.aggregation == "ffa"
    for name, param in model.named_parameters():
        if name.endswith("lora_A"):  # set both ways: the process may have run another rule
            param.requires_grad_(not freeze_a)
    data = client_data(cfg, base, path)
    per_round = steps_per_round(cfg, data)
    run = round_run(cfg, base, data, per_round * cfg.federated.rounds)
    losses = [train_step(run, (rnd - 1) * per_round + k).loss for k in range(per_round)]
    state = {k: v.clone() for k, v in adapter_state_dict(model).items()}  # not the live ones
    if cfg.federated.aggregation == "fedsa":
        keep_local(local_dir, rnd, {k: v for k, v in state.items() if is_lora_b(k)})
        if rnd == cfg.federated.rounds:  # this client's own adapter after its last steps
            save_adapter(model, local_dir.parent / "adapter", base_model=cfg.model.name,
                         overwrite=True)
    update = {k: state[k] for k in reply_keys(cfg, list(state), list(received))}
    return LocalResult(update, len(run.data.examples), sum(losses) / len(losses), len(losses))


def reply_keys(cfg: RunConfig, keys: list[str], received: list[str]) -> list[str]:
    """The keys sent back, in the order they came (Flower's fixedclipping_mod pairs the reply's
    tensors with the received ones by position)."""
    place = {k: i for i, k in enumerate(received)}
    return sorted(exchanged_keys(cfg.federated.aggregation, keys),
                  key=lambda k: place.get(k, len(place)))


def round_run(cfg: RunConfig, base: AdaptedBase, data: TrainData, total: int) -> Run:
    """What train_step needs for one round: a fresh optimizer over the adapter, the schedule
    over all rounds' `total` steps."""
    model = base.model
    model.train()
    runtime = OneProcess(next(model.parameters()).device)
    hooks = method_hooks(model, cfg.adapter, "default", total, data)
    forward = runtime.wrap_model(model, cfg)
    optimizer = build_optimizer(model, cfg.train)
    return Run(cfg, runtime, model, forward, optimizer, hooks, training_objective(cfg), data,
               MetricsLog(Path("unused"), enabled=False), total, 0, True, Totals(parts=0))


def keep_local(local_dir: Path, rnd: int, tensors: dict[str, torch.Tensor]) -> None:
    """The tensors that never leave this client (FedSA's B), kept per round so a resumed run
    starts each round from the same ones."""
    write_atomic_file(local_dir / f"round-{rnd:04d}.safetensors",
                      lambda tmp: save_file(tensors, str(tmp)), overwrite=True)


def _silent(*args, **kwargs) -> None:
    pass
