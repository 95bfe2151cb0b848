"""`loratune federate` against hostile clients (issue 31): replies that must be refused by the
client's id while the round goes on with the others, and nodes that lie about who they are."""

import io

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from local_grid import LocalGrid
from test_federate import fed_cfg, first_b, rounds, run_local

from loratune.federated.base import adapted_base
from loratune.federated.apps import build_client_app
from loratune.federated.server import FederationError, serve_rounds
from loratune.recipes.federate import setup


def corrupt(pid, change):
    """A client mod: partition `pid`'s train reply replaced by `change(arrays, metrics, config)`
    (arrays: name -> Array, so a payload Flower would not write can be planted)."""
    def mod(msg, context, call_next):
        reply = call_next(msg, context)
        if context.node_config["partition-id"] != pid or msg.metadata.message_type != "train":
            return reply
        arrays = dict(reply.content["arrays"].items())
        metrics, config = dict(reply.content["metrics"]), dict(reply.content["config"])
        change(arrays, metrics, config)
        content = {"arrays": ArrayRecord(arrays), "metrics": MetricRecord(metrics),
                   "config": ConfigRecord(config)}
        reply.content = RecordDict({k: v for k, v in content.items() if k != "drop"})
        return reply
    return mod


def as_array(tensor):
    return Array(tensor.numpy())


def with_tensor(key_of, make):
    def change(arrays, metrics, config):
        key = key_of(arrays)
        arrays[key] = as_array(make(torch.from_numpy(arrays[key].numpy())))
    return change


def pickled() -> Array:
    """An .npy payload whose body is a pickle (an object array): loading it would run code."""
    buffer = io.BytesIO()
    np.save(buffer, np.array([1, "a"], dtype=object), allow_pickle=True)
    return Array(dtype="float32", shape=(2,), stype="numpy.ndarray", data=buffer.getvalue())



HOSTILE = {
    # a count of examples that is not one: inf turns the mean into NaN, a huge one outweighs
    # every honest client (and two of them overflow the sum of weights)
    "inf examples": (lambda a, m, c: m.__setitem__("num-examples", float("inf")),
                     "num-examples inf"),
    "huge examples": (lambda a, m, c: m.__setitem__("num-examples", 1e300),
                      "num-examples 1e+300"),
    "fractional examples": (lambda a, m, c: m.__setitem__("num-examples", 2.5),
                            "num-examples 2.5"),
    # client 0 is the first in id order: the mean took its dtype, and fp16 overflows at 65504
    "fp16": (with_tensor(first_b, lambda t: t.half()), "dtype torch.float16"),
    "int": (with_tensor(first_b, lambda t: t.long()), "dtype torch.int64"),
    "complex": (with_tensor(first_b, lambda t: torch.complex(t, t * float("nan"))),
                "dtype torch.complex64"),
    "pickle": (lambda a, m, c: a.__setitem__(first_b(a), pickled()), "unreadable"),
    # a NaN loss was averaged into rounds.jsonl's train_loss (NaN: not JSON) and the round line
    "nan loss": (lambda a, m, c: m.__setitem__("loss", float("nan")), "loss nan"),
    "no round": (lambda a, m, c: m.pop("round"), "field 'round' missing"),
    "no fingerprint": (lambda a, m, c: c.pop("fingerprint"), "'fingerprint' missing"),
    "extra key": (lambda a, m, c: a.__setitem__("x.lora_A.weight", as_array(torch.ones(2, 2))),
                  "x.lora_A.weight unexpected"),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_a_hostile_reply_is_refused_by_id_and_the_round_completes(tmp_path, tiny_folder,
                                                                  data_file, kind):
    change, said = HOSTILE[kind]
    cfg = fed_cfg(tmp_path, tiny_folder, data_file, rounds=1, local_steps=1, min_clients=2)
    state = run_local(cfg, mods=[corrupt(0, change)])
    record = rounds(cfg)[0]
    assert record["accepted"] == [1, 2] and list(record["refused"]) == ["0"], record
    assert said in record["refused"]["0"]
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in state.values())


@pytest.mark.parametrize("claim, said", [
    (0, "partition-id 0 is claimed by nodes 101 and 102"),
    (7, "node 102 claims partition-id 7; expected 0 to 2 (federated.clients=3)"),
    ("one", "node 102 claims partition-id 'one'; expected 0 to 2"),
])
def test_a_node_claiming_another_clients_id_ends_the_run_by_name(tmp_path, tiny_folder,
                                                                  data_file, claim, said):
    """Clients are known by the partition id their node reports: a second node reporting the
    same id (or one no client has) would take that client's place, so the run stops naming
    the nodes instead of training on whichever answered last."""
    cfg = fed_cfg(tmp_path, tiny_folder, data_file, rounds=1, local_steps=1, min_clients=1)
    fed = setup(cfg, False, overwrite=False, quiet=True)
    def lie(msg, context, call_next):  # node 102 (partition 1) answers the query as `claim`
        reply = call_next(msg, context)
        if context.node_id == 102 and msg.metadata.message_type == "query":
            reply.content = RecordDict({"config": ConfigRecord({"partition-id": claim})})
        return reply

    grid = LocalGrid(build_client_app(fed, [lie]), cfg.federated.clients)
    with pytest.raises(FederationError, match=said.replace("(", r"\(").replace(")", r"\)")):
        serve_rounds(grid, fed, adapted_base(cfg))


def test_svd_refuses_factors_whose_product_overflows(tmp_path, tiny_folder, data_file):
    """Finite A and B of 1e30 each: their product s·B·A is inf in float32, and the SVD rule's
    linalg.svd of the mean failed to converge, ending the run for every client."""
    def huge(arrays, metrics, config):
        for key in arrays:
            arrays[key] = as_array(torch.full(arrays[key].shape, 1e30))

    cfg = fed_cfg(tmp_path, tiny_folder, data_file, rounds=1, local_steps=1, min_clients=2,
                  aggregation="svd")
    state = run_local(cfg, mods=[corrupt(0, huge)])
    record = rounds(cfg)[0]
    assert record["accepted"] == [1, 2] and "product B·A is not finite" in record["refused"]["0"]
    assert all(torch.isfinite(t).all() for t in state.values())
