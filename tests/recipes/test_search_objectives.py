"""loratune search beyond one held-out loss: several objectives (the Pareto front, its plot and
the chosen point), an eval task's metric and a GRPO reward as the objective, each direction
following its metric (tiny model, 2-step trials)."""

import json
from pathlib import Path

import optuna
import pytest
import yaml

import loratune.eval
from loratune.cli import main
from loratune.config import ConfigError, build_config, load_config
from loratune.recipes import search as search_recipe
from loratune.recipes.search_report import pareto_front, report_json

MC = Path(loratune.eval.__file__).parent / "samples" / "mc"


def base_config(tmp_path, tiny_folder, data_file, search: dict) -> Path:
    data = {"output_dir": str(tmp_path / "study"), "model": {"name": str(tiny_folder)},
            "adapter": {"r": 2, "target_modules": ["q_proj", "v_proj"]},
            "data": {"train": str(data_file), "eval": str(data_file), "max_length": 64},
            "train": {"max_steps": 2, "batch_size": 2, "eval_every": 1},
            "search": {"sampler": "random", "seed": 3, **search}}
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump(data))
    return config


def fake_study(directions: list[str], values: list[list[float]]):
    study = optuna.create_study(directions=directions)
    for v in values:
        study.add_trial(optuna.trial.create_trial(values=v, params={}, distributions={}))
    return study


def test_pareto_front_and_the_chosen_point():
    """Front: no other trial better on both; chosen: the front's best on the first objective,
    ties broken by the next (trial 3 ties trial 0 on loss with less memory)."""
    goal = search_recipe.Goal(("eval_loss", "peak_gib"), ("minimize", "minimize"))
    study = fake_study(["minimize", "minimize"], [[1.0, 5.0], [2.0, 1.0], [3.0, 3.0],
                                                   [1.0, 4.0], [1.5, 2.0]])
    assert [t.number for t in pareto_front(study, goal)] == [3, 1, 4]
    report = report_json(study, goal)
    assert report["best_trial"] == 3 and report["pareto"] == [3, 1, 4]
    assert [t["pareto"] for t in report["trials"]] == [False, True, False, True, True]
    # a maximized first objective: the highest value is chosen
    goal = search_recipe.Goal(("reward", "seconds"), ("maximize", "minimize"))
    study = fake_study(["maximize", "minimize"], [[0.2, 1.0], [0.9, 3.0], [0.5, 2.0]])
    assert report_json(study, goal)["best_trial"] == 1
    assert report_json(study, goal)["pareto"] == [1, 0, 2]


def test_multi_objective_study_writes_the_front_a_plot_and_the_chosen_best(
        tmp_path, tiny_folder, data_file, capsys):
    config = base_config(tmp_path, tiny_folder, data_file, {
        "space": {"lr": {"low": 1e-3, "high": 1e-1}, "r": [2, 8]},
        "objective": ["eval_loss", "peak_gib", "seconds"], "trials": 3})
    assert main(["search", str(config), "--quiet"]) == 0
    out = tmp_path / "study"
    report = json.loads((out / "report.json").read_text())
    assert report["objectives"] == ["eval_loss", "peak_gib", "seconds"]
    assert report["directions"] == ["minimize"] * 3
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{out / 'study.db'}")
    assert len(study.directions) == 3
    done = [t for t in report["trials"] if t["state"] == "complete"]
    assert len(done) == 3
    for t in done:  # each value is the trial process's own measurement
        res = t["result"]
        assert t["values"] == {"eval_loss": res["eval_loss"],
                               "peak_gib": pytest.approx(res["peak_rss_mib"] / 1024),
                               "seconds": res["seconds"]}
    front = [t for t in done if t["pareto"]]
    assert sorted(report["pareto"]) == [t["trial"] for t in front]
    for t in done:  # on the front exactly when no other trial is at least as good everywhere
        beaten = any(all(o["values"][k] <= t["values"][k] for k in report["objectives"]) and
                     o["values"] != t["values"] for o in done)
        assert t["pareto"] == (not beaten)
    best = min(front, key=lambda t: (t["values"]["eval_loss"], t["values"]["peak_gib"]))
    assert report["best_trial"] == best["trial"]
    best_cfg = load_config(out / "best.yaml")
    assert best_cfg.train.lr == best["params"]["lr"] and best_cfg.adapter.r == best["params"]["r"]
    png = (out / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    md = (out / "report.md").read_text()
    assert "Pareto front: trials" in md and "| measured peak GiB | training s |" in md
    assert "(Pareto)" in capsys.readouterr().out


def test_a_task_metric_is_the_objective_and_sets_the_direction(tmp_path, tiny_folder,
                                                               data_file):
    """objective task (mc acc, scored in the trial's process): maximized, the value the trial
    row holds; equal to `eval --task mc` of the trial's saved adapter."""
    from loratune.config.commands import EvalCommandConfig
    from loratune.eval.run import run_eval

    task = {"task": "mc", "data": str(MC / "test"), "options": {"shots": 1, "dev": str(MC / "dev")}}
    config = base_config(tmp_path, tiny_folder, data_file, {
        "space": {"lr": [0.05]}, "objective": "task", "task": task, "trials": 1})
    assert main(["search", str(config), "--quiet"]) == 0
    report = json.loads((tmp_path / "study" / "report.json").read_text())
    assert report["directions"] == ["maximize"] and report["labels"]["task"] == "mc acc"
    (trial,) = report["trials"]
    acc = trial["values"]["task"]
    assert 0 <= acc <= 1 and acc == trial["result"]["task_metrics"]["acc"]
    cfg = EvalCommandConfig(task="mc", data=str(MC / "test"), shots=1, dev=str(MC / "dev"),
                            adapter=[trial["result"]["adapter"]], base=False,
                            model={"name": str(tiny_folder)})
    assert acc == pytest.approx(run_eval(cfg).variants[0].result.metrics["acc"])


def goal(tmp_path, data_file, **search):
    cfg = build_config({"data": {"train": str(data_file), "eval": str(data_file)},
                        "search": search})
    return search_recipe.goal_of(cfg, "s.yaml")


def test_directions_follow_each_metric(tmp_path, data_file):
    text = tmp_path / "t.txt"
    text.write_text("some text to score\n")
    assert goal(tmp_path, data_file).directions == ("minimize",)
    got = goal(tmp_path, data_file, objective=["task", "peak_gib"],
               task={"task": "perplexity", "data": str(text)})
    assert got.directions == ("minimize", "minimize") and got.metric == "perplexity"
    got = goal(tmp_path, data_file, objective="task", task={"task": "mc", "data": str(MC / "test"),
                                                             "metric": "acc_norm"})
    assert got.directions == ("maximize",) and got.metric == "acc_norm"
    got = goal(tmp_path, data_file, objective=["eval_loss", "seconds"],
               direction=["minimize", "maximize"])  # given: kept
    assert got.directions == ("minimize", "maximize")


@pytest.mark.parametrize("search, train, named", [
    ({"objective": "reward"}, {}, "search.objective reward needs train.objective grpo"),
    ({"objective": "task"}, {}, "objective task needs search.task: {task: NAME, data: FILE}"),
    ({"objective": "task", "task": {"task": "mcq", "data": "x"}}, {},
     "search.task: --task 'mcq': no such task"),
    ({"objective": ["eval_loss", "seconds"], "pruner": "median"}, {},
     "pruner median with 2 objectives: Optuna prunes single-objective studies only"),
    ({"objective": ["eval_loss", "eval_loss"]}, {}, "expected one or more different names"),
    ({"objective": ["eval_loss", "seconds"], "direction": "minimize"}, {},
     "expected one per objective"),
    ({"objective": "eval_loss"}, {"objective": "grpo", "rl": {"rewards": [
        {"function": "exact_match"}], "num_generations": 2}},
     "train.objective grpo has no held-out loss; expected objective reward"),
])
def test_an_objective_the_run_cannot_score_fails_before_any_trial(tmp_path, data_file, search,
                                                                  train, named):
    config = tmp_path / "s.yaml"
    config.write_text(json.dumps({"data": {"train": str(data_file), "eval": str(data_file)},
                                  "train": train, "search": search}))
    with pytest.raises(ConfigError) as err:
        search_recipe.search_settings(str(config), [])
    assert named in str(err.value)


def test_an_unknown_task_metric_stops_the_search_naming_the_metrics(tmp_path):
    row = {"eval_loss": 1.0, "peak_rss_mib": 100, "seconds": 1.0, "task_metrics": {"acc": 0.5}}
    goal = search_recipe.Goal(("task",), ("maximize",), {"task": "mc"}, "accuracy")
    with pytest.raises(ConfigError, match="search.task.metric 'accuracy': task mc reports acc"):
        search_recipe.objective_values(row, goal, 0)


REWARD_FILE = '''
def vowels(prompts, completions, **kw):
    return [sum(ch in "aeiou" for ch in c) / (1 + len(c)) for c in completions]
'''


def test_a_grpo_reward_is_the_objective_maximized(tmp_path, tiny_folder):
    """objective reward: a GRPO trial trains with its own recipe; the value is its held-out
    mean reward (run_summary.json's eval_reward); the study maximizes it."""
    rewards = tmp_path / "rewards.py"
    rewards.write_text(REWARD_FILE)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {w}"}) + "\n" for w in
                               ["apple", "river", "stone", "cloud", "green", "metal"]))
    data = {"output_dir": str(tmp_path / "study"), "model": {"name": str(tiny_folder)},
            "adapter": {"r": 2, "target_modules": ["q_proj", "v_proj"]},
            "data": {"train": str(prompts), "eval_fraction": 0.34},
            "train": {"objective": "grpo", "max_steps": 2, "batch_size": 4, "eval_every": 1,
                      "rl": {"num_generations": 2, "max_completion_length": 4,
                             "rewards": [{"function": f"{rewards}:vowels"}]}},
            "search": {"space": {"lr": [0.02]}, "objective": "reward", "trials": 1}}
    config = tmp_path / "s.yaml"
    config.write_text(yaml.safe_dump(data))
    assert main(["search", str(config), "--quiet"]) == 0
    report = json.loads((tmp_path / "study" / "report.json").read_text())
    assert report["directions"] == ["maximize"]
    (trial,) = report["trials"]
    summary = json.loads((tmp_path / "study" / "trials" / "0" / "run_summary.json").read_text())
    assert summary["objective"] == "grpo"  # trained by the GRPO recipe, not the SFT loop
    assert trial["values"] == {"reward": summary["eval_reward"]}
    assert 0 <= summary["eval_reward"] <= 1


def test_report_columns_an_objective_shows_are_not_repeated():
    """peak_gib (or seconds) as an objective is its own column: the fixed measured-peak (or s)
    column is left out, so each header names one value once."""
    from loratune.recipes.search_report import markdown

    trial = {"trial": 0, "state": "complete", "pareto": True, "params": {"r": 8},
             "values": {"eval_loss": 0.9, "peak_gib": 1.4}, "planned_gib": 1.5,
             "measured_peak_gib": 1.4, "seconds": 51.0, "pruned_why": None, "failed_why": None}
    report = {"objectives": ["eval_loss", "peak_gib"], "best_trial": 0, "pareto": [0],
              "labels": {"eval_loss": "held-out loss", "peak_gib": "measured peak GiB"},
              "trials": [trial]}
    header, rule, row = markdown(report).splitlines()[-3:]
    assert header.count("measured peak GiB") == 1 and "| s |" in header
    assert header.count("|") == rule.count("|") == row.count("|")
