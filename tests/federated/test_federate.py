"""`loratune federate` on the tiny model: the server's rounds in process (LocalGrid) for the
exact comparisons, the Flower simulation (Ray) once, 3 clients × 2 rounds."""

import json

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from local_grid import LocalGrid

from loratune.adapters.io import adapter_state_dict
from loratune.config import build_config
from loratune.federated.apps import build_client_app
from loratune.federated.base import adapted_base
from loratune.federated.server import FederationError, serve_rounds
from loratune.recipes.federate import run_federate, setup


def fed_cfg(tmp_path, tiny_folder, data_file, name="run", **federated):
    return build_config({
        "output_dir": str(tmp_path / name), "model": {"name": str(tiny_folder)},
        "data": {"train": str(data_file), "max_length": 64},
        "train": {"batch_size": 2, "lr": 2e-2, "warmup_ratio": 0.0},
        "federated": {"clients": 3, "rounds": 2, "local_steps": 2, **federated}})


def run_local(cfg, mods=(), stop_at_round=None, resume=False, silent=()):
    fed = setup(cfg, resume, overwrite=False, quiet=True)
    grid = LocalGrid(build_client_app(fed, mods), cfg.federated.clients, stop_at_round, silent)
    return serve_rounds(grid, fed, adapted_base(cfg))


def rounds(cfg):
    with open(f"{cfg.output_dir}/rounds.jsonl") as f:
        return [json.loads(line) for line in f]


def test_one_client_equals_plain_training(tmp_path, tiny_folder, data_file):
    from loratune.train import train

    cfg = fed_cfg(tmp_path, tiny_folder, data_file, clients=1, rounds=1, local_steps=4)
    fed_state = run_local(cfg)
    plain = build_config({**cfg.model_dump(exclude={"federated"}),
                          "output_dir": str(tmp_path / "plain"),
                          "train": {**cfg.train.model_dump(), "max_steps": 4}})
    result = train(plain, quiet=True)
    from loratune.adapters.peft_format import read_adapter_weights

    want = read_adapter_weights(result.adapter_dir)
    assert sorted(fed_state) == sorted(want)
    for key in want:
        torch.testing.assert_close(fed_state[key], want[key], atol=1e-6, rtol=0)
    assert any(float(want[k].abs().max()) > 0 for k in want if "lora_B" in k)  # it trained
    mean_loss = sum(h["loss"] for h in result.history) / 4
    assert rounds(cfg)[0]["train_loss"] == pytest.approx(mean_loss, abs=1e-5)


def corrupt_client_1(change):
    """A client mod: partition 1's reply changed by `change(arrays, metrics, config)`."""
    def mod(msg, context, call_next):
        reply = call_next(msg, context)
        if context.node_config["partition-id"] != 1 or msg.metadata.message_type != "train":
            return reply
        arrays = dict(reply.content["arrays"].to_torch_state_dict())
        metrics = dict(reply.content["metrics"])
        config = dict(reply.content["config"])
        change(arrays, metrics, config)
        reply.content = RecordDict({"arrays": ArrayRecord(arrays),
                                    "metrics": MetricRecord(metrics),
                                    "config": ConfigRecord(config)})
        return reply
    return mod


def first_b(arrays):
    return next(k for k in arrays if "lora_B" in k)


BAD = {
    "nan": (lambda a, m, c: a[first_b(a)].view(-1).__setitem__(0, float("nan")),
            "non-finite"),
    "shape": (lambda a, m, c: a.__setitem__(first_b(a), torch.zeros(3, 3)), "has shape (3, 3)"),
    "missing": (lambda a, m, c: a.pop(first_b(a)), "missing"),
    "fingerprint": (lambda a, m, c: c.__setitem__("fingerprint", "0" * 64), "base fingerprint"),
    "stale": (lambda a, m, c: m.__setitem__("round", m["round"] - 1), "stale round"),
    "rank": (lambda a, m, c: a.__setitem__(first_b(a), a[first_b(a)][:, :2].clone()),
             "lora_B rank 2"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_a_bad_client_is_refused_by_id_and_the_round_completes(tmp_path, tiny_folder,
                                                               data_file, kind):
    change, said = BAD[kind]
    cfg = fed_cfg(tmp_path, tiny_folder, data_file, rounds=1, local_steps=1, min_clients=2,
                  aggregation="svd" if kind == "rank" else "fedavg")  # svd: any rank, paired
    state = run_local(cfg, mods=[corrupt_client_1(change)])
    record = rounds(cfg)[0]
    assert record["accepted"] == [0, 2] and list(record["refused"]) == ["1"]
    assert said in record["refused"]["1"]
    assert all(torch.isfinite(t).all() for t in state.values())
    assert (tmp_path / "run" / "global" / "round-0001" / "adapter_model.safetensors").is_file()


def test_a_client_that_never_answers_is_left_out_of_the_round(tmp_path, tiny_folder, data_file):
    cfg = fed_cfg(tmp_path, tiny_folder, data_file, rounds=1, local_steps=1, min_clients=2)
    run_local(cfg, silent=(2,))
    record = rounds(cfg)[0]
    assert record["accepted"] == [0, 1] and record["no_reply"] == [2]


def test_too_few_accepted_updates_fail_the_round_by_name(tmp_path, tiny_folder, data_file):
    cfg = fed_cfg(tmp_path, tiny_folder, data_file, rounds=1, local_steps=1, min_clients=3)
    with pytest.raises(FederationError, match=r"round 1: 2 accepted .*min_clients=3.*1: "
                                              r"'stale round"):
        run_local(cfg, mods=[corrupt_client_1(BAD["stale"][0])])


@pytest.mark.parametrize("aggregation", ["fedavg", "fedsa"])
def test_resume_after_a_stop_equals_the_uninterrupted_run(tmp_path, tiny_folder, data_file,
                                                          aggregation):
    whole = run_local(fed_cfg(tmp_path, tiny_folder, data_file, "whole", aggregation=aggregation))
    cfg = fed_cfg(tmp_path, tiny_folder, data_file, "stopped", aggregation=aggregation)
    with pytest.raises(KeyboardInterrupt):
        run_local(cfg, stop_at_round=2)
    assert [r["round"] for r in rounds(cfg)] == [1]
    resumed = run_local(cfg, resume=True)
    for key in whole:
        assert torch.equal(resumed[key], whole[key]), key
    assert [r["round"] for r in rounds(cfg)] == [1, 2]
    if aggregation == "fedsa":  # each client's own adapter, with the B it kept at home
        from loratune.adapters.peft_format import read_adapter_weights
        from loratune.readers import read_safetensors

        home = tmp_path / "stopped" / "clients" / "client-1"
        own = read_adapter_weights(home / "adapter")
        kept = read_safetensors(home / "local" / "round-0002.safetensors")
        assert sorted(kept) == sorted(k for k in own if "lora_B" in k)
        assert all(torch.equal(own[k], kept[k]) for k in kept)
        assert all(float(kept[k].abs().max()) > 0 for k in kept)


def test_ffa_keeps_a_at_the_shared_init_and_sends_only_b(tmp_path, tiny_folder, data_file):
    cfg = fed_cfg(tmp_path, tiny_folder, data_file, aggregation="ffa")
    state = run_local(cfg)
    init = adapted_base(cfg).init
    a_keys = [k for k in state if "lora_A" in k]
    assert a_keys and all(torch.equal(state[k], init[k]) for k in a_keys)
    live = adapter_state_dict(adapted_base(cfg).model)  # the clients' (in process: one model)
    assert all(torch.equal(live[k], init[k]) for k in a_keys)  # trained frozen, not discarded
    assert any(not torch.equal(state[k], init[k]) for k in state if "lora_B" in k)
    only_b = ArrayRecord({k: t for k, t in init.items() if "lora_B" in k}).count_bytes()
    assert rounds(cfg)[0]["bytes_down"] == 3 * only_b < 3 * ArrayRecord(init).count_bytes()


def test_simulation_three_clients_two_rounds(tmp_path, tiny_folder, data_file):
    """The real path: Flower's simulation engine (Ray), a client process per actor."""
    cfg = fed_cfg(tmp_path, tiny_folder, data_file)
    adapter = run_federate(cfg, quiet=True)
    log = rounds(cfg)
    assert [r["accepted"] for r in log] == [[0, 1, 2], [0, 1, 2]]
    assert all(r["bytes_down"] > 0 and r["bytes_up"] == r["bytes_down"] for r in log)
    local = run_local(fed_cfg(tmp_path, tiny_folder, data_file, "local"))
    from loratune.adapters.peft_format import read_adapter_weights

    got = read_adapter_weights(adapter)
    # The same rounds as in process; Ray's actors run one thread, so sums round differently.
    for key in local:
        torch.testing.assert_close(got[key], local[key], atol=1e-4, rtol=0)


def capture_updates(seen: dict):
    """A client mod that keeps each client's reply (in process), by partition id."""
    def mod(msg, context, call_next):
        reply = call_next(msg, context)
        if msg.metadata.message_type == "train" and reply.has_content():
            seen[context.node_config["partition-id"]] = (
                reply.content["arrays"].to_torch_state_dict(),
                reply.content["metrics"]["num-examples"])
        return reply
    return mod


@pytest.mark.parametrize("method", ["ia3", "prompt", "prefix", "bottleneck"])
def test_methods_that_average_are_fedavg_of_every_trained_tensor(tmp_path, tiny_folder,
                                                                   data_file, method):
    cfg = fed_cfg(tmp_path, tiny_folder, data_file, clients=2, rounds=1, local_steps=1,
                  partition="dirichlet:5")  # unequal clients: the weights matter
    cfg.adapter = build_config({"adapter": {"method": method}}).adapter
    seen = {}
    state = run_local(cfg, mods=[capture_updates(seen)])
    (s0, n0), (s1, n1) = seen[0], seen[1]
    assert n0 != n1 and sorted(s0) == sorted(state)
    for key in state:
        want = (s0[key].double() * n0 + s1[key].double() * n1) / (n0 + n1)
        torch.testing.assert_close(state[key].double(), want, atol=1e-6, rtol=0)
    assert any(not torch.equal(s0[k], s1[k]) for k in state)  # the clients did differ


def test_simulation_a_failing_client_under_min_clients_ends_the_run_by_name(
        tmp_path, tiny_folder, data_file):
    """In the engine: client 1's file holds no usable record, its error comes back as its
    reply, and with min_clients 2 the round's error reaches the caller."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"unrelated": 1}\n')
    cfg = fed_cfg(tmp_path, tiny_folder, data_file, clients=2, rounds=1, local_steps=1,
                  min_clients=2, client_data=[str(data_file), str(bad)])
    with pytest.raises(FederationError, match=r"round 1: 1 accepted updates.*failed: \{1: "):
        run_federate(cfg, quiet=True)
    assert not (tmp_path / "run" / "global").exists()  # no round was saved


def test_each_round_has_its_held_out_loss_and_the_dashboard_reads_the_curve(
        tmp_path, tiny_folder, data_file):
    from loratune.adapters.peft_format import read_adapter_weights
    from loratune.federated.held_out import held_out_loss
    from loratune.ui.runs import RunTable

    cfg = fed_cfg(tmp_path, tiny_folder, data_file, clients=2, rounds=3, local_steps=2)
    cfg.data.eval = str(data_file)  # the task every client learns a share of
    run_local(cfg)
    log = rounds(cfg)
    losses = [r["eval_loss"] for r in log]
    assert losses[0] > losses[1] > losses[2]
    base = adapted_base(cfg)
    again = held_out_loss(cfg, base, read_adapter_weights(tmp_path / "run/global/round-0002"))
    assert again == pytest.approx(losses[1], rel=1e-6)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(x["step"], x["loss"], x["eval_loss"]) for x in lines] == [
        (r["round"], r["train_loss"], r["eval_loss"]) for r in log]
    row = RunTable(tmp_path).row(tmp_path / "run")
    assert (row["step"], row["last_loss"], row["eval_loss"]) == (3, log[2]["train_loss"],
                                                                losses[2])
