"""Preference formulas beyond what the TRL comparison reaches, and their config options."""

import math

import pytest
import torch

from loratune.config import ConfigError, TrainConfig, build_config
from loratune.train.preference_loss import kto_losses, pair_losses, preference_means


def test_kto_kl_estimate_is_clamped_at_zero():
    cfg = TrainConfig(objective="kto", preference={"beta": 1.0})
    logps, ref = torch.tensor([-5.0, -6.0]), torch.tensor([-5.5, -5.0])
    desirable = torch.tensor([True, False])
    # the mismatched pairs are likelier under the reference: a negative estimate, taken as 0
    loss, rewards, kl = kto_losses(cfg, logps, ref, torch.tensor([-9.0, -9.0]),
                                   torch.tensor([-8.0, -8.0]), desirable)
    assert float(kl) == 0.0
    expected = ((1 - torch.sigmoid(torch.tensor(0.5))) + (1 - torch.sigmoid(torch.tensor(1.0))))
    torch.testing.assert_close(loss, expected / 2)
    torch.testing.assert_close(rewards, torch.tensor([0.5, -1.0]))


def test_dpo_label_smoothing_is_conservative_dpo():
    """-(1-e) log s(b D) - e log s(-b D), D the difference of log-ratios."""
    cfg = TrainConfig(objective="dpo", preference={"beta": 0.5, "label_smoothing": 0.2})
    logps = torch.tensor([[-3.0], [-4.0]])
    ref = torch.tensor([[-3.5], [-3.0]])
    loss, chosen, rejected = pair_losses("dpo", cfg, logps, torch.ones(2, 1), ref, None)
    z = 0.5 * ((-3.0 + 3.5) - (-4.0 + 3.0))
    expected = -0.8 * math.log(1 / (1 + math.exp(-z))) - 0.2 * math.log(1 / (1 + math.exp(z)))
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    assert float(chosen) == pytest.approx(0.25) and float(rejected) == pytest.approx(-0.5)


def test_default_beta_per_objective():
    assert TrainConfig(objective="dpo").preference.beta_for("dpo") == 0.1
    assert TrainConfig(objective="simpo").preference.beta_for("simpo") == 2.0
    assert TrainConfig(objective="simpo", preference={"beta": 1.5}).preference.beta_for(
        "simpo") == 1.5


def test_pair_metrics_are_means():
    means = preference_means({"n": 4, "rewards_chosen": 2.0, "rewards_rejected": -2.0,
                              "correct": 3})
    assert means == {"rewards_chosen": 0.5, "rewards_rejected": -0.5, "margin": 1.0,
                     "accuracy": 0.75}


@pytest.mark.parametrize("objective,option,owners", [
    ("sft", {"beta": 0.2}, "dpo/ipo/simpo/kto"),
    ("dpo", {"simpo_gamma": 1.0}, "simpo"),
    ("simpo", {"reference": "cached"}, "dpo/ipo/kto"),
    ("orpo", {"beta": 0.3}, "dpo/ipo/simpo/kto"),
    ("dpo", {"desirable_weight": 2.0}, "kto"),
])
def test_an_option_of_another_objective_is_an_error(objective, option, owners):
    with pytest.raises(ConfigError) as err:
        build_config({"train": {"objective": objective, "preference": option}})
    key = next(iter(option))
    assert f"train.preference.{key} applies to train.objective {owners}, not {objective}" \
        in str(err.value)


def test_unknown_objective_is_named():
    with pytest.raises(ConfigError, match="train.objective"):
        build_config({"train": {"objective": "rlhf"}})


def test_progress_bar_and_plot_show_the_preference_metrics(tmp_path):
    import json

    from loratune.train.loop import preference_postfix
    from loratune.train.metrics_log import plot_loss

    assert preference_postfix({"loss": 0.6, "accuracy": 0.75, "margin": 0.1234}) == \
        {"acc": "0.750", "margin": "0.123"}
    assert preference_postfix({"loss": 0.6, "kl": 0.5}) == {"kl": "0.500"}
    assert preference_postfix({"loss": 0.6}) == {}
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "loss": 0.69, "margin": 0.0, "accuracy": 0.0},
            {"step": 2, "loss": 0.5, "margin": 0.3, "accuracy": 1.0, "eval_loss": 0.6,
             "eval_margin": 0.2, "eval_accuracy": 0.5}]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot_loss(metrics, tmp_path / "pref.png")
    metrics.write_text("".join(json.dumps({"step": r["step"], "loss": r["loss"]}) + "\n"
                               for r in rows))
    plot_loss(metrics, tmp_path / "sft.png")
    from PIL import Image

    # a second panel (margin, accuracy) beside the loss: a wider figure
    assert Image.open(tmp_path / "pref.png").size[0] > Image.open(tmp_path / "sft.png").size[0]
