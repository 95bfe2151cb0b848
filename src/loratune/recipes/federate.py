"""`loratune federate run.yaml`: the run's adapter trained by simulated Flower clients.

setup (refusals, run folder, one training file per client) → Flower simulation of
federated.clients SuperNodes running the ServerApp and ClientApp of loratune.federated →
the final global adapter in <output_dir>/adapter, each round's in global/round-NNNN and
rounds.jsonl. `--resume` continues after the newest round folder.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from loratune.config import BASE_INITS, ConfigError, RunConfig
from loratune.data.bundled import resolve_data_paths
from loratune.federated import checkpoint as ckpt
from loratune.federated.partition import write_partitions
from loratune.federated.server import Federation, seed_of
from loratune.train.run_folder import write_config

# Aggregations that handle the LoRA factors themselves, and why other methods cannot use them.
LORA_ONLY = ("ffa", "fedsa", "svd")


def check_federated(cfg: RunConfig) -> None:
    """What `loratune federate` cannot do with this config, by field, before anything loads."""
    fed = cfg.federated
    if fed is None:
        raise ConfigError("loratune federate needs a federated: section (rounds, clients, "
                          "partition ...); see examples/federated.yaml")
    if cfg.train.objective != "sft":
        raise ConfigError(f"train.objective: {cfg.train.objective} is not federated yet; use sft")
    method = cfg.adapter.method
    if fed.aggregation in LORA_ONLY and (method != "lora" or getattr(cfg.adapter, "use_dora",
                                                                     False)):
        raise ConfigError(f"federated.aggregation: {fed.aggregation} works on LoRA's A and B; "
                          f"adapter.method {method} averages with fedavg")
    if method == "adalora":
        raise ConfigError("adapter.method: adalora prunes ranks per client, so client updates "
                          "no longer share shapes; use lora (aggregation svd takes any rank)")
    init = str(getattr(cfg.adapter, "init_lora_weights", True))
    if init in (*BASE_INITS, "eva") or init.startswith("pissa"):
        raise ConfigError(f"adapter.init_lora_weights: {init} starts from the base weights or "
                          "data of one process; clients must share the base and the init: use "
                          "true or gaussian")
    if fed.client_data is None and not isinstance(cfg.data.train, str):
        raise ConfigError("data.train: a list of sources cannot be partitioned; name one file "
                          "or give federated.client_data (one file per client)")
    if cfg.data.streaming is True:
        raise ConfigError("data.streaming: true: each client reads its file whole; set false")


def client_files(cfg: RunConfig, out: Path) -> list[str]:
    """Each client's training file: federated.client_data, or data.train partitioned into
    out/clients/client-<k>/train.jsonl (the same split every start)."""
    fed = cfg.federated
    if fed.client_data is not None:
        for path in fed.client_data:
            if not Path(path).is_file():
                raise ConfigError(f"federated.client_data: {path} is not a file")
        return list(fed.client_data)
    train, _ = resolve_data_paths(cfg)
    paths = write_partitions(train, fed.partition, fed.clients, seed_of(cfg), out / "clients")
    return [str(p) for p in paths]


def backend_config(cfg: RunConfig) -> dict:
    """Ray: one CPU per client actor; on CUDA, clients share the GPU."""
    resources = {"num_cpus": 1, "num_gpus": 0.0}
    if cfg.model.device.startswith("cuda"):
        resources["num_gpus"] = 1.0 / max(1, min(cfg.federated.per_round(), 4))
    return {"client_resources": resources,
            "init_args": {"num_cpus": max(1, min(os.cpu_count() or 1, cfg.federated.clients)),
                          "include_dashboard": False, "logging_level": logging.ERROR}}


def setup(cfg: RunConfig, resume: bool, overwrite: bool, quiet: bool) -> Federation:
    check_federated(cfg)
    out = Path(cfg.output_dir)
    ckpt.prepare_dir(out, resume, overwrite)
    write_config(out, cfg)
    files = client_files(cfg, out)
    return Federation(cfg, out, files, resume, quiet)


def run_federate(cfg: RunConfig, resume: bool = False, overwrite: bool = False,
                 quiet: bool = False) -> Path:
    """The simulation, start to end; the final adapter's folder."""
    from flwr.simulation import run_simulation

    from loratune.federated.apps import build_client_app, build_server_app, run_mods

    fed = setup(cfg, resume, overwrite, quiet)
    run_simulation(build_server_app(fed), build_client_app(fed, run_mods(cfg)),
                   num_supernodes=cfg.federated.clients, backend_config=backend_config(cfg))
    if not (fed.out / "adapter").is_dir():
        raise RuntimeError(f"the Flower simulation ended without a final adapter in {fed.out}; "
                           "see its log above")
    return fed.out / "adapter"
