"""The server's rounds on a Flower Grid: sample clients, send the global adapter, check every
reply, aggregate the accepted ones, checkpoint, log the round (rounds.jsonl).

Clients are known by their partition id (the node's `partition-id`), not by Flower's node ids,
which change with every start: the sample of round r is a function of (seed, r), so a resumed
run asks the same clients as the uninterrupted one, and updates are aggregated in id order.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from loratune.adapters.io import config_dict
from loratune.config import RunConfig
from loratune.data.templates import store_template
from loratune.adapters.peft_format import write_peft_folder
from loratune.federated import checkpoint as ckpt
from loratune.federated.aggregate import ClientUpdate, aggregate, exchanged_keys
from loratune.federated.base import AdaptedBase
from loratune.federated.checks import Expected, refusal
from loratune.federated.held_out import held_out_loss, write_metrics
from loratune.federated.privacy import Ledger, round_config
from loratune.federated.secagg import EQUAL_WEIGHTS_KEY, MAX_WEIGHT_KEY, secure_round


class FederationError(ValueError):
    """A round that cannot complete (too few accepted updates, clients that never joined);
    a ValueError, so the command line prints it as one line."""


@dataclass
class Federation:
    """Everything both apps need: the run config, its folder, each client's training file."""

    cfg: RunConfig
    out: Path
    client_files: list[str]
    resume: bool = False
    quiet: bool = False  # no progress lines from the clients either

    def log(self, *args) -> None:
        if not self.quiet:
            print(*args, flush=True)


@dataclass
class RoundReplies:
    accepted: dict[int, ClientUpdate] = field(default_factory=dict)  # partition id -> update
    refused: dict[int, str] = field(default_factory=dict)  # partition id -> why
    failed: dict[int, str] = field(default_factory=dict)  # the client's error
    losses: dict[int, float] = field(default_factory=dict)
    bytes_up: int = 0


def serve_rounds(grid: Grid, fed: Federation, base: AdaptedBase) -> dict[str, torch.Tensor]:
    """Every round from the first (or after the last checkpoint on resume) to the last; the
    final global adapter, also written to <output_dir>/adapter."""
    start, state = 0, dict(base.init)
    if fed.resume:
        start, state = ckpt.last_round(fed.out)
        fed.log(f"federate: resuming after round {start}")
    records = ckpt.read_rounds(fed.out, start)
    ledger = privacy_ledger(fed, records)
    nodes = partitions(grid, fed)
    for rnd in range(start + 1, fed.cfg.federated.rounds + 1):
        state, record = one_round(grid, fed, base, nodes, rnd, state)
        if ledger is not None:
            state, record["privacy"] = ledger.release(
                state, exchanged_keys(fed.cfg.federated.aggregation, list(state)),
                len(record["accepted"]))
        record["eval_loss"] = held_out_loss(fed.cfg, base, state)
        ckpt.save_round(fed.out, rnd, state, adapter_config(fed, base))
        records.append(record)
        ckpt.write_rounds(fed.out, records)
        write_metrics(fed.out, records)
        fed.log(round_line(record, fed.cfg.federated.rounds))
    folder = write_peft_folder(fed.out / "adapter", state, adapter_config(fed, base),
                               overwrite=True)
    store_template(folder, fed.cfg.data.template)
    return state


def privacy_ledger(fed: Federation, records: list[dict]) -> Ledger | None:
    """federated.privacy's noise and accountant, with a resumed run's rounds accounted."""
    if fed.cfg.federated.privacy is None:
        return None
    ledger = Ledger(fed.cfg.federated.privacy, fed.cfg.federated.clients)
    ledger.replay(records)
    return ledger


def adapter_config(fed: Federation, base: AdaptedBase) -> dict:
    return config_dict(base.model, "default", base_model=fed.cfg.model.name)


def partitions(grid: Grid, fed: Federation) -> dict[int, int]:
    """Partition id -> node id of every client, once all federated.clients have joined."""
    want, deadline = fed.cfg.federated.clients, time.monotonic() + fed.cfg.federated.round_timeout
    while len(nodes := list(grid.get_node_ids())) < want:
        if time.monotonic() > deadline:
            raise FederationError(f"{len(nodes)} of federated.clients={want} clients joined "
                                  f"within round_timeout ({fed.cfg.federated.round_timeout} s)")
        time.sleep(0.2)
    asks = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n,
                    message_type=MessageType.QUERY) for n in nodes]
    found = {}
    for reply in grid.send_and_receive(asks, timeout=fed.cfg.federated.round_timeout):
        if not reply.has_error():
            claim(found, reply.content["config"].get("partition-id"),
                  reply.metadata.src_node_id, want)
    return found


def claim(found: dict[int, int], pid, node: int, clients: int) -> None:
    """Node `node` as client `pid`: a node reporting another's id (or none a client has) would
    take that client's place in every round, so the run stops and names it."""
    if not (isinstance(pid, int) and 0 <= pid < clients):
        raise FederationError(f"node {node} claims partition-id {pid!r}; expected 0 to "
                              f"{clients - 1} (federated.clients={clients})")
    if pid in found:
        raise FederationError(f"partition-id {pid} is claimed by nodes {found[pid]} and {node}; "
                              "expected each client's node to report its own")
    found[pid] = node


def sample(ids: list[int], k: int, seed: int, rnd: int) -> list[int]:
    return sorted(random.Random(f"{seed}:{rnd}").sample(sorted(ids), min(k, len(ids))))


def one_round(grid: Grid, fed: Federation, base: AdaptedBase, nodes: dict[int, int], rnd: int,
              state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    if fed.cfg.federated.secagg is not None:
        return one_secure_round(grid, fed, base, nodes, rnd, state)
    t0, f = time.perf_counter(), fed.cfg.federated
    chosen = sample(list(nodes), f.per_round(), seed_of(fed.cfg), rnd)
    sent = ArrayRecord({k: state[k] for k in exchanged_keys(f.aggregation, list(state))})
    config = ConfigRecord({"round": rnd, **round_config(fed.cfg)})
    asks = [Message(RecordDict({"arrays": sent, "config": config}),
                    dst_node_id=nodes[p], message_type=MessageType.TRAIN) for p in chosen]
    by_node = {n: p for p, n in nodes.items()}
    expected = Expected(rnd, base.fingerprint, {k: tuple(state[k].shape) for k in sent},
                        free_rank=f.aggregation == "svd",
                        clip=f.privacy.clip if f.privacy else None,
                        start={k: state[k] for k in sent})
    replies = RoundReplies()
    for reply in grid.send_and_receive(asks, timeout=f.round_timeout):
        read_reply(reply, by_node.get(reply.metadata.src_node_id, -1), expected, replies)
    dropped = [p for p in chosen if p not in {**replies.accepted, **replies.refused,
                                             **replies.failed}]
    if len(replies.accepted) < f.min_clients:
        raise FederationError(f"round {rnd}: {len(replies.accepted)} accepted updates, "
                              f"federated.min_clients={f.min_clients} (refused: "
                              f"{replies.refused or 'none'}; failed: {replies.failed or 'none'}; "
                              f"no reply: {dropped or 'none'})")
    scales = base.scales()  # every client runs the run's adapter config: the server's scales
    updates = [replies.accepted[p] for p in sorted(replies.accepted)]
    for update in updates:
        update.scales = scales
        if f.privacy is not None:  # DP: each client moves the mean by at most clip/n
            update.weight = 1.0
    state = aggregate(f.aggregation, updates, state, scales=scales,
                      rank=getattr(fed.cfg.adapter, "r", None))
    return state, round_record(rnd, chosen, replies, dropped, sent.count_bytes() * len(asks),
                               time.perf_counter() - t0)


def one_secure_round(grid: Grid, fed: Federation, base: AdaptedBase, nodes: dict[int, int],
                     rnd: int, state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """A round through SecAgg+ (secagg.py): the server gets the examples-weighted mean of the
    sent tensors and each client's metadata, never an update."""
    t0, f = time.perf_counter(), fed.cfg.federated
    chosen = sample(list(nodes), f.per_round(), seed_of(fed.cfg), rnd)
    sent = ArrayRecord({k: state[k] for k in exchanged_keys(f.aggregation, list(state))})
    content = RecordDict({"arrays": sent, "config": ConfigRecord(
        {"round": rnd, MAX_WEIGHT_KEY: float(f.secagg.max_weight),
         EQUAL_WEIGHTS_KEY: f.privacy is not None, **round_config(fed.cfg)})})
    try:
        got = secure_round(grid, f.secagg, rnd, [nodes[p] for p in chosen], content,
                           f.round_timeout)
    except RuntimeError as err:
        raise FederationError(f"round {rnd}: {err}") from None
    by_node = {n: p for p, n in nodes.items()}
    expected = Expected(rnd, base.fingerprint, {k: tuple(state[k].shape) for k in sent},
                        clip=f.privacy.clip if f.privacy else None,  # the mean of clipped
                        start={k: state[k] for k in sent})           # updates is within it
    replies = RoundReplies(failed={by_node[n]: why for n, why in got.failed.items()},
                           bytes_up=got.bytes_up)
    for node, meta in got.metadata.items():
        examples = float(meta["num-examples"])
        why = refusal(expected, int(meta["round"]), str(meta["fingerprint"]), examples, got.mean)
        if why:
            replies.refused[by_node[node]] = why
        replies.accepted[by_node[node]] = ClientUpdate({}, examples)
        replies.losses[by_node[node]] = float(meta["loss"])
    if replies.refused or len(replies.accepted) < f.min_clients:
        raise FederationError(f"round {rnd}: SecAgg+ sums every answering client, so none can "
                              f"be refused alone (refused: {replies.refused or 'none'}; "
                              f"{len(replies.accepted)} answered, federated.min_clients="
                              f"{f.min_clients}; failed: {replies.failed or 'none'})")
    return {**state, **got.mean}, round_record(rnd, chosen, replies, [],
                                               sent.count_bytes() * len(chosen),
                                               time.perf_counter() - t0)


def seed_of(cfg: RunConfig) -> int:
    return cfg.federated.seed if cfg.federated.seed is not None else cfg.train.seed


def read_reply(reply: Message, pid: int, expected: Expected, replies: RoundReplies) -> None:
    """Sort one reply into accepted, refused or failed."""
    if reply.has_error():
        replies.failed[pid] = str(reply.error.reason)[-300:]
        return
    try:  # a reply is the client's to write: a missing field or payload is its refusal
        arrays, metrics, config = (reply.content[k] for k in ("arrays", "metrics", "config"))
        replies.bytes_up += arrays.count_bytes()
        rnd, fingerprint = int(metrics["round"]), str(config["fingerprint"])
        examples, loss = float(metrics["num-examples"]), float(metrics["loss"])
        update = arrays.to_torch_state_dict()  # numpy payloads, never unpickled
    except KeyError as err:
        replies.refused[pid] = f"reply field {err} missing"
        return
    except (TypeError, ValueError) as err:
        replies.refused[pid] = f"reply unreadable: {str(err)[:200]}"
        return
    why = refusal(expected, rnd, fingerprint, examples, update)
    if why is None and not math.isfinite(loss):  # averaged into rounds.jsonl (NaN: not JSON)
        why = f"loss {loss}: expected a finite number"
    if why:
        replies.refused[pid] = why
        return
    replies.accepted[pid] = ClientUpdate(update, examples)
    replies.losses[pid] = loss


def round_record(rnd: int, chosen: list[int], replies: RoundReplies, dropped: list[int],
                 bytes_down: int, seconds: float) -> dict:
    """The round's line in rounds.jsonl (client ids are partition ids)."""
    n = sum(u.weight for u in replies.accepted.values())
    loss = sum(replies.losses[p] * replies.accepted[p].weight for p in replies.accepted) / n
    return {"round": rnd, "clients": chosen, "accepted": sorted(replies.accepted),
            "refused": {str(p): why for p, why in sorted(replies.refused.items())},
            "failed": {str(p): why for p, why in sorted(replies.failed.items())},
            "no_reply": dropped, "train_loss": round(loss, 6),
            "client_loss": {str(p): round(v, 6) for p, v in sorted(replies.losses.items())},
            "bytes_down": bytes_down, "bytes_up": replies.bytes_up,
            "seconds": round(seconds, 3)}


def round_line(record: dict, rounds: int) -> str:
    line = (f"round {record['round']}/{rounds}: {len(record['accepted'])}/"
            f"{len(record['clients'])} clients, train loss {record['train_loss']:.4f}, "
            f"sent {record['bytes_down'] / 1e6:.3f} MB down, {record['bytes_up'] / 1e6:.3f} MB up")
    if record.get("eval_loss") is not None:
        line += f", held-out loss {record['eval_loss']:.4f}"
    if "privacy" in record:
        eps = record["privacy"]["epsilon"]
        line += f", privacy ε = {eps:.4g}" if eps is not None else ", privacy ε = ∞ (no noise)"
        line += f" at δ = {record['privacy']['delta']:g}"
    for kind in ("refused", "failed"):
        for pid, why in record[kind].items():
            line += f"\n  client {pid} {kind}: {why}"
    if record["no_reply"]:
        line += f"\n  no reply from clients {record['no_reply']} (round_timeout)"
    return line
