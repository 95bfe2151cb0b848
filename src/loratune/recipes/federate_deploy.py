"""The apps Flower's deployment mode runs (SuperLink + SuperNodes, started with `flwr run`):
a Flower App folder (examples/federated_app/pyproject.toml) names `server_app` and `client_app`
here, and its run config names the loratune YAML. Both build the same apps as the simulation
(apps.py) from that file, once per process.

The server writes the run folder (output_dir); each SuperNode trains on its own file, named by
its node config: `--node-config 'partition-id=0 data-path="/data/mine.jsonl"'` (and optionally
`client-dir`), so the data never needs to be where the server is.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from loratune.config import ConfigError, RunConfig, load_config
from loratune.federated import checkpoint as ckpt
from loratune.federated.apps import build_client_app, run_mods
from loratune.federated.base import adapted_base
from loratune.federated.server import Federation, serve_rounds
from loratune.recipes.federate import check_federated
from loratune.train.run_folder import write_config

server_app = ServerApp()
client_app = ClientApp()
_CLIENTS: dict[str, ClientApp] = {}  # config file -> its ClientApp, built once per process


def run_yaml(context: Context) -> RunConfig:
    """The run config named by the Flower run config's `config` (a path on this machine)."""
    path = str(context.run_config.get("config") or "")
    if not path or not Path(path).is_file():
        raise ConfigError(f"flwr run --run-config 'config=\"...\"': {path!r} is not a file on "
                          "this machine; expected the loratune YAML of the federated run")
    return load_config(path)


def deployment_federation(cfg: RunConfig, resume: bool, overwrite: bool) -> Federation:
    """The server's side: the run folder prepared (no partitioning: clients bring their own
    files)."""
    check_federated(cfg)
    out = Path(cfg.output_dir)
    ckpt.prepare_dir(out, resume, overwrite)
    write_config(out, cfg)
    return Federation(cfg, out, [], resume)


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    cfg = run_yaml(context)
    fed = deployment_federation(cfg, bool(context.run_config.get("resume", False)),
                                bool(context.run_config.get("overwrite", False)))
    serve_rounds(grid, fed, adapted_base(cfg))


def node_client(context: Context) -> ClientApp:
    path = str(context.run_config.get("config") or "")
    if path not in _CLIENTS:
        cfg = run_yaml(context)
        if "data-path" not in context.node_config:
            raise ConfigError("this SuperNode has no data-path: start it with --node-config "
                              "'partition-id=N data-path=\"/path/train.jsonl\"'")
        fed = Federation(cfg, Path(cfg.output_dir), [])
        _CLIENTS[path] = build_client_app(fed, run_mods(cfg))
    return _CLIENTS[path]


@client_app.query()
def client_query(msg: Message, context: Context) -> Message:
    return node_client(context)(msg, context)


@client_app.train()
def client_train(msg: Message, context: Context) -> Message:
    return node_client(context)(msg, context)
