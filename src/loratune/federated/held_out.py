"""The server's view of each round: the global adapter's held-out loss on data.eval (when it
names a file), and metrics.jsonl, the file the dashboard (`loratune ui`) draws a run's curves
from: one line per round, `step` being the round."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from loratune.adapters.io import copy_adapter_weights
from loratune.config import RunConfig
from loratune.data.bundled import resolve_data_paths
from loratune.federated.base import AdaptedBase
from loratune.files import write_atomic_file
from loratune.train.loop import TrainData, evaluate_loss, setup_data
from loratune.train.runtime import OneProcess

_EVAL: dict[str, TrainData] = {}  # data.eval -> its encoded batches, read once per process


def eval_data(cfg: RunConfig, base: AdaptedBase) -> TrainData | None:
    if not isinstance(cfg.data.eval, str):
        return None
    _, path = resolve_data_paths(cfg)  # a bundled name (demo) or a file
    if path not in _EVAL:
        _EVAL[path] = setup_data(cfg, base.tokenizer, (path, path), lambda *a, **k: None)
    return _EVAL[path]


def held_out_loss(cfg: RunConfig, base: AdaptedBase, state: dict[str, torch.Tensor]
                  ) -> float | None:
    """The held-out loss per label token of the global adapter `state` (None without a
    data.eval file). In process the clients share this model; each copies its round's start
    into it before training, so evaluating between rounds leaves them unchanged."""
    data = eval_data(cfg, base)
    if data is None or not data.eval_batches:
        return None
    copy_adapter_weights(base.model, "default", state, Path("the round's global adapter"))
    runtime = OneProcess(next(base.model.parameters()).device)
    forward = runtime.wrap_model(base.model, cfg)
    return evaluate_loss(base.model, forward, data.eval_batches, runtime, show=False)


def write_metrics(out: Path, records: list[dict]) -> None:
    """metrics.jsonl from rounds.jsonl's records (rewritten whole: a resumed run's rounds)."""
    lines = []
    for r in records:
        line = {"step": r["round"], "loss": r["train_loss"], "seconds": r["seconds"],
                "bytes_up": r["bytes_up"], "bytes_down": r["bytes_down"]}
        if r.get("eval_loss") is not None:
            line["eval_loss"] = r["eval_loss"]
        if r.get("privacy", {}).get("epsilon") is not None:
            line["epsilon"] = r["privacy"]["epsilon"]
        lines.append(json.dumps(line) + "\n")
    write_atomic_file(out / "metrics.jsonl",
                      lambda tmp: tmp.write_text("".join(lines), encoding="utf-8"),
                      overwrite=True)
