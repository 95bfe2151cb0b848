"""loss.png's panels: GRPO runs get the mean reward per function and the held-out reward."""

from __future__ import annotations

import json

from PIL import Image

from loratune.train.metrics_log import plot_loss, reward_panel

GRPO = [{"step": 0, "eval_reward": 0.2},
        {"step": 1, "loss": 0.1, "reward/numeric/mean": 0.1, "reward/regex/mean": 0.5,
         "reward": 0.2},
        {"step": 2, "loss": 0.0, "reward/numeric/mean": 0.3, "reward/regex/mean": None,
         "reward": 0.3, "eval_reward": 0.35}]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_reward_panel_has_one_curve_per_function_and_the_held_out_reward():
    ylabel, curves = reward_panel(GRPO)
    assert "reward" in ylabel
    assert curves == {"numeric": ([(1, 0.1), (2, 0.3)], False), "regex": ([(1, 0.5)], False),
                      "held-out reward": ([(0, 0.2), (2, 0.35)], True)}
    assert reward_panel([{"step": 1, "loss": 1.0, "eval_reward": 0.5}])[1] == {}


def test_a_grpo_loss_png_is_wider_than_a_plain_one(tmp_path):
    plot_loss(_write(tmp_path / "grpo.jsonl", GRPO), tmp_path / "grpo.png")
    plain = [{"step": r["step"], "loss": r["loss"]} for r in GRPO if "loss" in r]
    plot_loss(_write(tmp_path / "plain.jsonl", plain), tmp_path / "plain.png")
    assert Image.open(tmp_path / "grpo.png").size[0] > Image.open(tmp_path / "plain.png").size[0]


def test_resume_truncation_drops_a_line_the_kill_cut_short(tmp_path):
    """kill -9 during a long completions.jsonl write leaves a last line without its end: the
    resume drops it with the other records past the checkpoint (was a JSONDecodeError, and no
    resume); a bad line before it is not the log's to judge and stays."""
    from loratune.train.metrics_log import MetricsLog

    path = tmp_path / "completions.jsonl"
    lines = [json.dumps({"step": 1}), "not json", json.dumps({"step": 2}),
             json.dumps({"step": 3}), '{"step": 3, "completion": "cut sh']
    path.write_text("\n".join(lines))
    MetricsLog(path).truncate_after(2)
    assert path.read_text() == "\n".join(lines[:3]) + "\n"


def test_the_loss_plot_skips_a_line_that_is_no_record(tmp_path):
    """The plot runs after the adapter is saved and before the run is marked finished: a bad
    line in metrics.jsonl (kept by the resume above) must not fail a finished run."""
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\nnot json\n[1]\n"
                    + json.dumps({"step": 2, "loss": 1.5}) + "\n")
    assert plot_loss(path, tmp_path / "loss.png") is not None
