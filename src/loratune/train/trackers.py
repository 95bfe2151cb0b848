"""Experiment trackers (`train.report_to`): TensorBoard, MLflow, Weights & Biases.

Each gets the run's config when it opens, every line written to metrics.jsonl, and the final
adapter path (or how the run ended) when it closes. Their packages are optional: the extra
`loratune[trackers]` installs all three, and a missing one is a ConfigError naming it before
the slow part of a run.
"""

from __future__ import annotations

import importlib.util
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from loratune.config import ConfigError, RunConfig

# tracker -> (the module it needs, the pip package that provides it)
NEEDS = {"tensorboard": ("tensorboard", "tensorboard"),
         "mlflow": ("mlflow", "mlflow-skinny"),
         "wandb": ("wandb", "wandb")}


def check_trackers(names: list[str]) -> None:
    """A ConfigError naming the package and the extra for each tracker that cannot import."""
    missing = [(n, NEEDS[n][1]) for n in names if importlib.util.find_spec(NEEDS[n][0]) is None]
    if missing:
        what = ", ".join(f"{name} needs the {pkg} package" for name, pkg in missing)
        raise ConfigError(f"train.report_to: {what}; install it with pip install "
                          f"'loratune[trackers]' (or the package alone), or remove it from "
                          "train.report_to")


def metric_tag(key: str) -> str:
    """metrics.jsonl key -> tracker tag: eval_loss -> eval/loss, loss -> train/loss."""
    return "eval/loss" if key == "eval_loss" else f"train/{key}"


def numeric_metrics(record: dict) -> dict[str, float]:
    """The record's numeric values under tracker tags (step itself is the x axis)."""
    return {metric_tag(k): float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def flat_config(cfg: RunConfig) -> dict[str, str]:
    """{'train.lr': '0.0002', ...}: the config as flat string parameters."""
    out: dict[str, str] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = str(value)

    walk("", cfg.model_dump())
    return out


class TensorBoardTracker:
    """Event files in <run>/tensorboard (`tensorboard --logdir runs/`)."""

    def __init__(self, cfg: RunConfig, out: Path):
        from torch.utils.tensorboard import SummaryWriter
        import yaml

        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        text = yaml.safe_dump(cfg.model_dump(), sort_keys=False)
        self.writer.add_text("config", "```\n" + text + "```", 0)

    def log(self, record: dict) -> None:
        for tag, value in numeric_metrics(record).items():
            self.writer.add_scalar(tag, value, record["step"])

    def close(self, state: str, adapter_dir: Path | None) -> None:
        self.writer.add_text("outcome", f"{state}; adapter: {adapter_dir or 'none'}", 0)
        self.writer.close()


class MlflowTracker:
    """A run in experiment 'loratune' of `train.mlflow_uri` ($MLFLOW_TRACKING_URI, else a local
    file store in <run>/mlruns)."""

    def __init__(self, cfg: RunConfig, out: Path):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = cfg.train.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") \
            or (out / "mlruns").resolve().as_uri()
        with file_store_allowed():
            self.client = MlflowClient(tracking_uri=uri)
            exp = self.client.get_experiment_by_name("loratune")  # the store is made here
        exp_id = exp.experiment_id if exp else self.client.create_experiment("loratune")
        self.run_id = self.client.create_run(exp_id, run_name=out.name).info.run_id
        params = [Param(k, v[:6000]) for k, v in flat_config(cfg).items()]
        self.client.log_batch(self.run_id, params=params)

    def log(self, record: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(tag, value, now, record["step"])
                   for tag, value in numeric_metrics(record).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, state: str, adapter_dir: Path | None) -> None:
        if adapter_dir is not None:
            self.client.set_tag(self.run_id, "adapter_dir", str(adapter_dir))
        status = {"finished": "FINISHED", "interrupted": "KILLED"}.get(state, "FAILED")
        self.client.set_terminated(self.run_id, status=status)


@contextmanager
def file_store_allowed() -> Iterator[None]:
    """MLflow 3 refuses its file store (./mlruns, the local default here) unless
    MLFLOW_ALLOW_FILE_STORE is true; allow it while the client opens, without changing the
    environment for anything else. (`mlflow ui --backend-store-uri DIR` needs the same.)"""
    before = os.environ.get("MLFLOW_ALLOW_FILE_STORE")
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        yield
    finally:
        if before is None:
            del os.environ["MLFLOW_ALLOW_FILE_STORE"]
        else:
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = before


class WandbTracker:
    """A W&B run under <run>/wandb, offline unless $WANDB_MODE says otherwise (`wandb sync`
    uploads an offline run later)."""

    def __init__(self, cfg: RunConfig, out: Path):
        import wandb

        self.run = wandb.init(project=cfg.train.wandb_project, name=out.name, dir=str(out),
                              config=cfg.model_dump(),
                              mode=os.environ.get("WANDB_MODE", "offline"))

    def log(self, record: dict) -> None:
        self.run.log(numeric_metrics(record), step=record["step"])

    def close(self, state: str, adapter_dir: Path | None) -> None:
        self.run.summary["outcome"] = state
        if adapter_dir is not None:
            self.run.summary["adapter_dir"] = str(adapter_dir)
        self.run.finish(exit_code=0 if state == "finished" else 1)
        import wandb

        # finish() leaves the last records in the W&B service's write buffer; the run's file
        # is complete on disk only once the service stops.
        wandb.teardown()


TRACKERS = {"tensorboard": TensorBoardTracker, "mlflow": MlflowTracker, "wandb": WandbTracker}


def open_trackers(cfg: RunConfig, out: Path) -> list:
    """One open tracker per name in cfg.train.report_to."""
    check_trackers(cfg.train.report_to)
    return [TRACKERS[name](cfg, Path(out)) for name in cfg.train.report_to]
