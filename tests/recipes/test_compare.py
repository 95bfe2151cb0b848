"""compare / tune-rank: adapter sections per method, ranking, and a real two-variant run."""

import json

import pytest

from loratune.cli import main
from loratune.config import ConfigError
from loratune.recipes.compare import best_rank, markdown_table, method_adapter, parse_method_values


def test_method_adapter_keeps_only_options_the_method_has():
    base = {"method": "lora", "r": 16, "lora_alpha": 32, "target_modules": "all-linear"}
    assert method_adapter(base, "ia3") == {"method": "ia3"}
    assert method_adapter(base, "dora") == {"r": 16, "lora_alpha": 32,
                                            "target_modules": "all-linear", "method": "dora"}
    assert method_adapter(base, "adalora")["init_r"] == 24
    assert method_adapter(base, "prompt") == {"method": "prompt"}
    with pytest.raises(ValueError, match="unknown method 'lorra'"):
        method_adapter(base, "lorra")


def test_per_method_values_are_checked():
    assert parse_method_values("ia3=1e-2, lora=2e-4", ["lora", "ia3"], "--lr") == {
        "ia3": 0.01, "lora": 0.0002}
    with pytest.raises(ConfigError, match="--lr item 'dora=1': expected METHOD=VALUE"):
        parse_method_values("dora=1", ["lora"], "--lr")
    with pytest.raises(ConfigError, match="'x' is not a number"):
        parse_method_values("lora=x", ["lora"], "--lr")


def test_best_rank_prefers_score_then_loss_then_size():
    rows = [{"variant": "r4", "score": 0.5, "eval_loss": 1.0, "trainable": 10},
            {"variant": "r8", "score": 0.7, "eval_loss": 1.2, "trainable": 20},
            {"variant": "r16", "score": 0.7, "eval_loss": 1.1, "trainable": 40},
            {"variant": "r32", "score": 0.7, "eval_loss": 1.1, "trainable": 80}]
    assert best_rank(rows)["variant"] == "r16"
    table = markdown_table([{**rows[0], "method": "lora", "lr": 1e-3, "trainable_pct": 1.0,
                             "final_loss": 2.0, "seconds_per_step": 0.5, "peak_rss_mib": 900,
                             "mergeable": "yes"}])
    assert "| r4 | lora | 0.001 | 10 | 1.000 | 50.0% | 1.0000 | 2.0000 | 0.50 | 900 | yes |" in table


@pytest.mark.slow
def test_compare_two_methods_on_the_real_model(tmp_path, capsys):
    out = tmp_path / "cmp"
    config = tmp_path / "c.yaml"
    config.write_text("adapter: {r: 4, lora_alpha: 8}\n")
    code = main(["compare", str(config), "train.max_steps=3", "train.batch_size=2",
                 "eval.limit=4", "eval.max_new_tokens=8", "data.max_length=128",
                 "--methods", "lora,ia3", "--lr", "ia3=1e-2", "--out", str(out), "--quiet"])
    assert code == 0
    rows = json.loads((out / "compare.json").read_text())
    assert [r["method"] for r in rows] == ["lora", "ia3"]
    lora, ia3 = rows
    assert ia3["trainable"] < lora["trainable"] and lora["mergeable"] == "yes"
    assert ia3["lr"] == 1e-2 and lora["lr"] == 2e-4
    assert all(r["peak_rss_mib"] > 100 and r["seconds_per_step"] > 0 for r in rows)
    assert all(0 <= r["score"] <= 1 for r in rows)
    assert (out / "compare.png").stat().st_size > 1000
    assert "| lora | lora |" in capsys.readouterr().out


@pytest.mark.slow
def test_tune_rank_runs_each_rank_and_names_the_best(tmp_path, capsys):
    out = tmp_path / "tr"
    config = tmp_path / "c.yaml"
    config.write_text("adapter: {r: 8, lora_alpha: 16}\n")
    code = main(["tune-rank", str(config), "train.max_steps=2", "train.batch_size=2",
                 "eval.limit=4", "eval.max_new_tokens=8", "data.max_length=128",
                 "--ranks", "2,4", "--out", str(out), "--quiet"])
    assert code == 0
    rows = json.loads((out / "tune_rank.json").read_text())
    assert [r["variant"] for r in rows] == ["r2", "r4"]
    assert rows[1]["trainable"] == 2 * rows[0]["trainable"]  # params grow linearly with r
    printed = capsys.readouterr().out
    assert "best: r" in printed and (out / "tune_rank.md").is_file()


def test_compare_includes_an_eval_tasks_score(tmp_path, tiny_folder, data_file, capsys):
    """compare --task mc: each trained adapter's acc on the bundled MMLU-layout sample (1-shot),
    equal to `eval --task mc` on the saved adapter."""
    import loratune.eval
    from loratune.config.commands import EvalCommandConfig
    from loratune.eval.run import run_eval

    samples = __import__("pathlib").Path(loratune.eval.__file__).parent / "samples" / "mc"
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"model": {"name": str(tiny_folder)},
                                  "adapter": {"r": 2, "target_modules": ["q_proj", "v_proj"]},
                                  "data": {"train": str(data_file)},
                                  "train": {"max_steps": 2, "batch_size": 2, "lr": 0.05}}))
    out = tmp_path / "cmp"
    assert main(["compare", str(config), "--methods", "lora", "--out", str(out), "--quiet",
                 "--task", "mc", "--task-data", str(samples / "test"),
                 "--task-option", "shots=1", "--task-option", f"dev={samples / 'dev'}"]) == 0
    (row,) = json.loads((out / "compare.json").read_text())
    assert row["task"] == "mc acc"
    cfg = EvalCommandConfig(task="mc", data=str(samples / "test"), shots=1,
                            dev=str(samples / "dev"), adapter=[row["adapter"]], base=False,
                            model={"name": str(tiny_folder)})
    assert row["task_score"] == pytest.approx(run_eval(cfg).variants[0].result.metrics["acc"])
    assert "| mc acc |" in (out / "compare.md").read_text()
    assert main(["compare", str(config), "--task", "mc"]) == 2
    assert "--task mc needs --task-data FILE" in capsys.readouterr().err
