"""The Flower apps of a federation, built from loratune's own training: a ServerApp that runs
the rounds (server.py) and a ClientApp that trains locally (client.py). The simulation and
deployment mode run these same apps; `mods` are Flower client mods (differential privacy,
SecAgg+) wrapped around the client's handlers.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from loratune import progress
from loratune.federated.base import adapted_base
from loratune.federated import privacy, secagg
from loratune.federated.client import local_train
from loratune.federated.server import Federation, serve_rounds


def build_server_app(fed: Federation) -> ServerApp:
    """The ServerApp: the rounds of `fed` on whatever Grid Flower gives it (what it raises
    ends the run; the simulation engine re-raises it in the caller)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        serve_rounds(grid, fed, adapted_base(fed.cfg))

    return app


def partition_id(context: Context) -> int:
    """This node's client id: `partition-id` of its node config (the simulation sets it; a
    deployment SuperNode is started with --node-config partition-id=N)."""
    if "partition-id" not in context.node_config:
        raise ValueError("node config has no partition-id: start the SuperNode with "
                         "--node-config 'partition-id=N'")
    return int(context.node_config["partition-id"])


def client_paths(fed: Federation, context: Context) -> tuple[str, Path]:
    """(training file, folder for what this client keeps) from the node config
    (`data-path`, `client-dir`) or the federation's partition files."""
    pid = partition_id(context)
    config = context.node_config
    data = str(config.get("data-path") or fed.client_files[pid])
    home = Path(str(config.get("client-dir") or fed.out / "clients" / f"client-{pid}"))
    return data, home / "local"


def run_mods(cfg) -> list:
    """The client mods the run config asks for: SecAgg+ outermost (it masks what the inner
    ones leave), DP clipping inside it."""
    return [*secagg.client_mods(cfg), *privacy.client_mods(cfg)]


def build_client_app(fed: Federation, mods: list | tuple = ()) -> ClientApp:
    app = ClientApp(mods=list(mods))

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        pid = partition_id(context)
        return Message(RecordDict({"config": ConfigRecord({"partition-id": pid})}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        progress.set_quiet(fed.quiet)  # a client process is not the one --quiet was given to
        base = adapted_base(fed.cfg)
        rnd = int(msg.content["config"]["round"])
        path, local_dir = client_paths(fed, context)
        result = local_train(fed.cfg, base, path, msg.content["arrays"].to_torch_state_dict(),
                             rnd, local_dir)
        metrics = MetricRecord({"num-examples": result.examples, "loss": result.loss,
                                "round": rnd, "steps": result.steps,
                                "partition-id": partition_id(context)})
        return Message(RecordDict({"arrays": ArrayRecord(result.update), "metrics": metrics,
                                   "config": ConfigRecord({"fingerprint": base.fingerprint})}),
                       reply_to=msg)

    return app
