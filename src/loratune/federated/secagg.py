"""Secure aggregation with Flower's SecAgg+ (Bell et al. 2020): each client quantizes its
examples-weighted adapter tensors and masks them (pairwise masks that cancel in the sum, and a
private one recovered from secret shares), so the server learns only the weighted mean.

Flower 1.42 ships SecAgg+ as a workflow of its legacy strategy API (FitIns/FitRes). Here its
four stages run inside loratune's own round: the stages are Flower's (SecAggPlusWorkflow's
setup, share_keys, collect_masked_vectors and unmask, and secaggplus_mod on the clients); the
messages the clients train on are ours, and `fit_reply_mod` hands the client's reply to
secaggplus_mod in the FitRes layout it reads. What the server can still check per client is the
metadata (base fingerprint, round, example count); the tensors it checks summed (shapes, finite
values). A client refused on its metadata cannot be taken out of a masked sum, so the round
fails by its id (resume repeats it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import (Code, FitIns, FitRes, Status, ndarrays_to_parameters,
                         parameters_to_ndarrays)
from flwr.compat.common.recorddict_compat import fitres_to_recorddict
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from loratune.config import RunConfig
from loratune.config.federated import SecAggOptions

MAX_WEIGHT_KEY = "secagg-max-weight"
EQUAL_WEIGHTS_KEY = "secagg-equal-weights"  # DP: every client weighs 1, not its examples


def client_mods(cfg: RunConfig) -> list:
    """The client mods of SecAgg+ (outermost first); none without federated.secagg."""
    return [secaggplus_mod, fit_reply_mod] if cfg.federated.secagg is not None else []


def fit_reply_mod(msg: Message, context: Context, call_next) -> Message:
    """The client's train reply (arrays, metrics, config) as the FitRes secaggplus_mod masks;
    its metadata rides in the FitRes metrics."""
    reply = call_next(msg, context)
    if msg.metadata.message_type != MessageType.TRAIN or reply.has_error():
        return reply
    content = reply.content
    examples = int(content["metrics"]["num-examples"])
    limit = float(msg.content["config"][MAX_WEIGHT_KEY])
    weight = 1 if msg.content["config"].get(EQUAL_WEIGHTS_KEY) else examples
    if weight > limit:  # past it, SecAgg+'s integer sums overflow (Flower only warns)
        raise ValueError(f"this client holds {examples} examples, more than "
                         f"federated.secagg.max_weight {limit:g}; raise it")
    metrics = {**dict(content["metrics"]), "fingerprint": str(content["config"]["fingerprint"])}
    arrays = [t.numpy() for t in content["arrays"].to_torch_state_dict().values()]
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), weight, metrics)
    return Message(fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


@dataclass
class SecureReplies:
    """What the server learns in a SecAgg+ round: the weighted mean, each client's metadata."""

    mean: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[int, dict] = field(default_factory=dict)  # node id -> its FitRes metrics
    failed: dict[int, str] = field(default_factory=dict)  # node id -> error
    bytes_up: int = 0  # everything the clients sent: keys, shares, masked vectors


class CountingGrid:
    """A Grid that adds up the bytes of the protocol's replies (all in config records)."""

    def __init__(self, grid: Grid):
        self.grid, self.bytes_up = grid, 0

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if reply.has_content():
                self.bytes_up += sum(len(v) for record in reply.content.config_records.values()
                                     for value in record.values()
                                     for v in (value if isinstance(value, list) else [value])
                                     if isinstance(v, bytes))
        return replies


class _Strategy:
    """The part of a legacy Strategy the SecAgg+ stages call: which nodes train (all of the
    round's sample) and where the unmasked result goes."""

    def __init__(self, nodes: list[int]):
        self.nodes = nodes
        self.results: list = []

    def configure_fit(self, rnd, parameters, client_manager):
        return [(SimpleNamespace(node_id=n), FitIns(parameters, {})) for n in self.nodes]

    def aggregate_fit(self, rnd, results, failures):
        self.results = results
        return None, {}


def secure_round(grid: Grid, options: SecAggOptions, rnd: int, nodes: list[int],
                 content: RecordDict, timeout: float) -> SecureReplies:
    """One round's train messages (`content`) to `nodes` through SecAgg+'s four stages."""
    workflow = SecAggPlusWorkflow(options.num_shares, options.reconstruction_threshold,
                                  max_weight=options.max_weight,
                                  clipping_range=options.clipping_range,
                                  quantization_range=options.quantization_range,
                                  timeout=timeout)
    strategy = _Strategy(nodes)
    sent = content["arrays"]
    context = SimpleNamespace(
        state=RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({Key.CURRENT_ROUND: rnd}),
                          MAIN_PARAMS_RECORD: sent}),
        strategy=strategy, client_manager=SimpleNamespace(num_available=lambda: len(nodes)))
    state, grid = WorkflowState(), CountingGrid(grid)
    out = SecureReplies()
    stages = (workflow.setup_stage, workflow.share_keys_stage,
              workflow.collect_masked_vectors_stage, workflow.unmask_stage)
    for k, stage in enumerate(stages):
        if k == 2:  # the clients train on our message, not on a legacy FitIns
            state.nid_to_fitins = {n: RecordDict(dict(content.items())) for n in nodes}
        if not stage(grid, context, state):
            reasons = "; ".join(str(e)[-200:] for e in state.failures) or "too few clients"
            raise RuntimeError(f"SecAgg+ stopped at its {stage.__name__}: {reasons}")
    for proxy, fitres in strategy.results:
        out.metadata[proxy.node_id] = dict(fitres.metrics)
    errors = "; ".join(str(e)[-200:] for e in state.failures) or "no masked vector"
    out.failed = {n: errors for n in nodes if n not in out.metadata}
    out.bytes_up = grid.bytes_up
    if strategy.results:
        out.mean = named_mean(sent, parameters_to_ndarrays(strategy.results[0][1].parameters))
    return out


def named_mean(sent: ArrayRecord, arrays: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """The unmasked mean's arrays under the names (and dtypes) of what was sent."""
    if len(arrays) != len(sent):
        raise RuntimeError(f"SecAgg+ returned {len(arrays)} arrays for {len(sent)} sent")
    return {k: torch.from_numpy(np.asarray(a).astype(sent[k].numpy().dtype))
            for k, a in zip(sent.keys(), arrays)}
