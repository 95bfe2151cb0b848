"""federated.privacy: Flower's fixedclipping_mod bounds each client's update, the server refuses
an unclipped one, adds noise of std z·clip/n to the mean and reports ε from the RDP accountant
(in process, LocalGrid)."""

import math

import pytest
import torch
from test_federate import fed_cfg, rounds, run_local

from loratune.config import ConfigError, build_config
from loratune.federated.privacy import clip_train_replies, client_mods, update_norm


def private_cfg(tmp_path, tiny_folder, data_file, name="run", clip=1.0, noise=0.0, **federated):
    federated = {"clients": 2, "rounds": 1, "local_steps": 2, **federated}
    return fed_cfg(tmp_path, tiny_folder, data_file, name,
                   privacy={"clip": clip, "noise_multiplier": noise, "delta": 1e-5},
                   **federated)


def capture_norms(norms: dict):
    """A client mod: the norm of each reply's update (what it sent back minus what it got)."""
    def mod(msg, context, call_next):
        reply = call_next(msg, context)
        if msg.metadata.message_type == "train" and reply.has_content():
            start = msg.content["arrays"].to_torch_state_dict()
            norms[context.node_config["partition-id"]] = update_norm(
                reply.content["arrays"].to_torch_state_dict(), start)
        return reply
    return mod


def test_each_client_update_is_clipped_to_the_bound(tmp_path, tiny_folder, data_file):
    cfg = private_cfg(tmp_path, tiny_folder, data_file, clip=0.01)
    sent, trained = {}, {}
    run_local(cfg, mods=[capture_norms(sent), *client_mods(cfg), capture_norms(trained)])
    assert sorted(sent) == [0, 1] and all(trained[p] > 0.01 for p in trained)  # clipping bit
    assert all(sent[p] <= 0.01 * (1 + 1e-5) for p in sent), sent
    assert all(sent[p] == pytest.approx(0.01, rel=1e-4) for p in sent)  # scaled, not zeroed
    assert rounds(cfg)[0]["accepted"] == [0, 1]


def test_a_client_that_does_not_clip_is_refused_by_id(tmp_path, tiny_folder, data_file):
    def clip_but_client_1(msg, context, call_next):
        if context.node_config["partition-id"] == 1:
            return call_next(msg, context)
        return clip_train_replies(msg, context, call_next)

    cfg = private_cfg(tmp_path, tiny_folder, data_file, clip=0.01)
    run_local(cfg, mods=[clip_but_client_1])
    record = rounds(cfg)[0]
    assert record["accepted"] == [0] and list(record["refused"]) == ["1"]
    assert "exceeds federated.privacy.clip 0.01" in record["refused"]["1"]


def test_epsilon_grows_with_rounds_as_the_rdp_accountant_says(tmp_path, tiny_folder, data_file):
    from dp_accounting import dp_event
    from dp_accounting.rdp import RdpAccountant

    cfg = private_cfg(tmp_path, tiny_folder, data_file, noise=1.1, rounds=3, local_steps=1)
    run_local(cfg, mods=client_mods(cfg))
    eps = [r["privacy"]["epsilon"] for r in rounds(cfg)]
    assert eps[0] < eps[1] < eps[2]
    for k, got in enumerate(eps, start=1):
        direct = RdpAccountant()
        direct.compose(dp_event.GaussianDpEvent(1.1), k)
        assert got == pytest.approx(direct.get_epsilon(1e-5), rel=1e-5)
    assert all(r["privacy"]["noise_std"] == pytest.approx(1.1 * 1.0 / 2) for r in rounds(cfg))


def test_no_noise_equals_no_dp_and_noise_has_its_std(tmp_path, tiny_folder, data_file):
    """iid: 4 examples per client, so DP's equal weights are fedavg's weights."""
    plain = run_local(fed_cfg(tmp_path, tiny_folder, data_file, "plain", clients=2, rounds=1,
                              local_steps=2))
    quiet_cfg = private_cfg(tmp_path, tiny_folder, data_file, "zero", clip=10.0, noise=0.0)
    quiet = run_local(quiet_cfg, mods=client_mods(quiet_cfg))
    for key in plain:
        torch.testing.assert_close(quiet[key], plain[key], atol=1e-6, rtol=0)
    assert rounds(quiet_cfg)[0]["privacy"]["epsilon"] is None  # no noise: no guarantee
    noisy_cfg = private_cfg(tmp_path, tiny_folder, data_file, "noisy", clip=10.0, noise=0.002)
    noisy = run_local(noisy_cfg, mods=client_mods(noisy_cfg))
    diff = torch.cat([(noisy[k] - quiet[k]).flatten() for k in plain])
    assert diff.numel() > 1000
    assert float(diff.std()) == pytest.approx(0.002 * 10.0 / 2, rel=0.1)
    assert abs(float(diff.mean())) < 0.002 * 10.0 / 2 / math.sqrt(diff.numel()) * 5


def test_privacy_config_is_checked(tmp_path):
    base = {"output_dir": str(tmp_path), "federated": {"privacy": {"clip": 1.0,
                                                                    "noise_multiplier": 1.0}}}
    with pytest.raises(ConfigError, match="svd"):
        build_config({**base, "federated": {**base["federated"], "aggregation": "svd"}})
    with pytest.raises(ConfigError, match="federated.privacy.clip"):
        build_config({**base, "federated": {"privacy": {"clip": 0, "noise_multiplier": 1.0}}})
    assert build_config(base).federated.privacy.delta == 1e-5
