"""federated.secagg: rounds through Flower's SecAgg+ (in process, LocalGrid): the server gets
the examples-weighted mean within the quantization error and never a client's tensors; a client
dropping after the key exchange is recovered from the others' shares."""

import pytest
from flwr.client.mod import secaggplus_mod

from test_federate import capture_updates, fed_cfg, rounds, run_local

from loratune.config import ConfigError, build_config
from loratune.federated.apps import run_mods
from loratune.federated.base import adapted_base
from loratune.federated.secagg import fit_reply_mod

SECAGG = {"max_weight": 8.0, "clipping_range": 8.0, "quantization_range": 2 ** 22}


def secure_cfg(tmp_path, tiny_folder, data_file, **federated):
    return fed_cfg(tmp_path, tiny_folder, data_file, rounds=1, local_steps=2, secagg=SECAGG,
                   **federated)


def no_arrays_leave(seen: list):
    """Outermost mod: what a client sends the server in each SecAgg+ stage."""
    def mod(msg, context, call_next):
        reply = call_next(msg, context)
        if msg.metadata.message_type == "train" and reply.has_content():
            seen.append(sum(len(r) for r in reply.content.array_records.values()))
        return reply
    return mod


def weighted_mean(seen: dict, ids: list[int]) -> dict:
    total = sum(seen[p][1] for p in ids)
    return {k: sum(seen[p][0][k].double() * seen[p][1] for p in ids) / total
            for k in seen[ids[0]][0]}


def bound(seen: dict, ids: list[int]) -> float:
    """The quantization error of the mean: one level per value and client over the sum of
    the clients' weights (examples / max_weight)."""
    step = 2 * SECAGG["clipping_range"] / SECAGG["quantization_range"]
    return len(ids) * step / sum(seen[p][1] / SECAGG["max_weight"] for p in ids)


def test_secagg_mean_equals_fedavg_within_the_quantization_error(tmp_path, tiny_folder,
                                                                 data_file):
    cfg = secure_cfg(tmp_path, tiny_folder, data_file)  # iid: 3, 3 and 2 examples
    seen, sent_up = {}, []
    assert run_mods(cfg) == [secaggplus_mod, fit_reply_mod]
    state = run_local(cfg, mods=[no_arrays_leave(sent_up), *run_mods(cfg),
                                 capture_updates(seen)])
    assert sorted(seen) == [0, 1, 2] and len({seen[p][1] for p in seen}) > 1
    assert len(sent_up) == 3 * 4 and not any(sent_up)  # 4 stages, never an array record
    want, tol = weighted_mean(seen, [0, 1, 2]), bound(seen, [0, 1, 2])
    errors = [float((state[k].double() - want[k]).abs().max()) for k in want]
    assert 0 < max(errors) <= tol, (max(errors), tol)  # quantized, within one level each
    plain = {k: sum(seen[p][0][k].double() for p in seen) / 3 for k in want}  # not by examples
    assert max(float((state[k].double() - plain[k]).abs().max()) for k in want) > 10 * tol
    record = rounds(cfg)[0]
    assert record["accepted"] == [0, 1, 2] and record["bytes_up"] > record["bytes_down"]


def test_a_client_dropping_mid_protocol_is_recovered_from_shares(tmp_path, tiny_folder,
                                                                 data_file):
    def client_2_fails_to_train(msg, context, call_next):
        if context.node_config["partition-id"] == 2 and msg.metadata.message_type == "train":
            raise RuntimeError("client 2 lost")
        return call_next(msg, context)

    cfg = secure_cfg(tmp_path, tiny_folder, data_file)
    seen = {}
    state = run_local(cfg, mods=[*run_mods(cfg), client_2_fails_to_train,
                                 capture_updates(seen)])
    record = rounds(cfg)[0]
    assert record["accepted"] == [0, 1] and list(record["failed"]) == ["2"]
    want, tol = weighted_mean(seen, [0, 1]), bound(seen, [0, 1])
    assert max(float((state[k].double() - want[k]).abs().max()) for k in want) <= tol


def test_secagg_config_is_checked(tmp_path):
    base = {"output_dir": str(tmp_path), "federated": {"secagg": {}}}
    assert build_config(base).federated.secagg.max_weight == 1000.0
    for extra, said in [({"aggregation": "svd"}, "svd"), ({"clients": 1}, "at least 2")]:
        with pytest.raises(ConfigError, match=said):
            build_config({**base, "federated": {"secagg": {}, **extra}})


def test_secagg_with_dp_is_the_equal_weight_mean_of_clipped_updates(tmp_path, tiny_folder,
                                                                     data_file):
    from loratune.federated.privacy import clip_train_replies, update_norm

    cfg = secure_cfg(tmp_path, tiny_folder, data_file,
                     privacy={"clip": 0.5, "noise_multiplier": 0.0})
    assert run_mods(cfg) == [secaggplus_mod, fit_reply_mod, clip_train_replies]
    seen = {}
    start = adapted_base(cfg).init  # round 1 starts every client here
    state = run_local(cfg, mods=[secaggplus_mod, fit_reply_mod, capture_updates(seen),
                                 clip_train_replies])
    assert all(update_norm(seen[p][0], {k: start[k] for k in seen[p][0]}) <= 0.5 * 1.0001
               for p in seen)
    ones = {p: (seen[p][0], 1) for p in seen}  # DP: every client weighs the same
    want = weighted_mean(ones, [0, 1, 2])
    tol = 3 * (2 * SECAGG["clipping_range"] / SECAGG["quantization_range"]) / (3 / 8)
    assert max(float((state[k].double() - want[k]).abs().max()) for k in want) <= tol
    by_examples = weighted_mean(seen, [0, 1, 2])  # what SecAgg+ alone would give
    assert max(float((state[k].double() - by_examples[k]).abs().max()) for k in want) > 3 * tol
    assert rounds(cfg)[0]["privacy"]["epsilon"] is None
