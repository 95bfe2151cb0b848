"""loratune search with two workers on one study, best.yaml training to the reported score,
and tune-rank as a preset of search (tiny model, 2-step trials)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from loratune.cli import main
from loratune.recipes import search as search_recipe


def study_config(tmp_path, tiny_folder, data_file, trials: int, **search) -> Path:
    data = {"output_dir": str(tmp_path / "study"), "model": {"name": str(tiny_folder)},
            "adapter": {"r": 2, "target_modules": ["q_proj", "v_proj"]},
            "data": {"train": str(data_file), "eval": str(data_file), "max_length": 64},
            "train": {"max_steps": 2, "batch_size": 2, "eval_every": 1, "seed": 5},
            "search": {"space": {"lr": {"low": 1e-3, "high": 1e-1}, "r": [2, 4]},
                       "trials": trials, "sampler": "random", "seed": 3, "pruner": "none",
                       **search}}
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump(data))
    return config


def test_two_workers_on_one_study_split_the_trials(tmp_path, tiny_folder, data_file):
    """Two `loratune search` processes on the same study.db: together they finish exactly
    search.trials trials, each trial run once (by one worker, in its own folder), and no two
    draw the same values."""
    config = study_config(tmp_path, tiny_folder, data_file, trials=4)
    env = {**os.environ, "PYTHONPATH": str(Path(search_recipe.__file__).parents[2])}
    workers = [subprocess.Popen([sys.executable, "-m", "loratune.cli", "search", str(config),
                                 "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env) for _ in range(2)]
    outputs = [w.communicate(timeout=600) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    out = tmp_path / "study"
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{out / 'study.db'}")
    done = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(done) == 4
    assert all(t.state.name == "COMPLETE" for t in done)
    surplus = [t for t in study.trials if t.state.name == "FAIL"]
    assert all(t.user_attrs["failed_why"].startswith("surplus:") and "config" not in
               t.user_attrs for t in surplus)  # a surplus trial never sampled or ran
    adapters = {t.user_attrs["result"]["adapter"] for t in done}
    assert adapters == {str(out / "trials" / str(t.number) / "adapter") for t in done}
    assert len({t.params["lr"] for t in done}) == 4  # workers do not draw the same values
    runs = sorted(p.name for p in (out / "trials").iterdir() if p.name.endswith(".run"))
    assert runs == sorted(f"{t.number}.run" for t in done)
    report = json.loads((out / "report.json").read_text())
    assert sum(t["state"] == "complete" for t in report["trials"]) == 4


def eval_loss_of(run: Path) -> float:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["eval_loss"] for r in records if "eval_loss" in r][-1]


def test_best_yaml_trains_to_the_reported_score(tmp_path, tiny_folder, data_file):
    config = study_config(tmp_path, tiny_folder, data_file, trials=2)
    assert main(["search", str(config), "--quiet"]) == 0
    out = tmp_path / "study"
    report = json.loads((out / "report.json").read_text())
    reported = report["trials"][report["best_trial"]]["values"]["eval_loss"]
    assert main(["train", str(out / "best.yaml"), "--quiet"]) == 0
    assert eval_loss_of(out / "best") == pytest.approx(reported, abs=1e-4)


def test_tune_rank_is_a_grid_study_over_r(tmp_path, tiny_folder, data_file, capsys):
    """One trial per rank (alpha/r kept), its study and report beside tune_rank.json/md/png,
    which keep compare's row shape."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_folder)},
        "adapter": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": str(data_file), "eval": str(data_file), "max_length": 64},
        "train": {"max_steps": 2, "batch_size": 2}}))
    out = tmp_path / "tr"
    assert main(["tune-rank", str(config), "--ranks", "2,4,6", "--out", str(out),
                 "--quiet"]) == 0
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{out / 'study.db'}")
    assert sorted(t.params["r"] for t in study.trials) == [2, 4, 6]
    assert sorted(t.user_attrs["config"]["adapter"]["lora_alpha"] for t in study.trials) == \
        [4.0, 8.0, 12.0]  # alpha / r = 16 / 8 kept
    rows = json.loads((out / "tune_rank.json").read_text())
    assert [r["variant"] for r in rows] == ["r2", "r4", "r6"]
    assert rows[1]["trainable"] == 2 * rows[0]["trainable"]  # params grow linearly with r
    assert all(r["peak_rss_mib"] > 50 and r["seconds_per_step"] > 0 for r in rows)
    best = min(rows, key=lambda r: r["eval_loss"])
    printed = capsys.readouterr().out
    assert f"best: {best['variant']} (held-out loss {best['eval_loss']:.4f}" in printed
    assert yaml.safe_load((out / "best.yaml").read_text())["adapter"]["r"] == best["r"]
    assert (out / "tune_rank.png").stat().st_size > 1000 and (out / "report.md").is_file()


def quick_study(tmp_path, sampler: str = "random"):
    from loratune.config import SearchConfig

    search = SearchConfig(space={"lr": {"low": 1e-4, "high": 1e-1}}, sampler=sampler,
                          trials=4)
    goal = search_recipe.Goal(("eval_loss",), ("minimize",))
    return search, search_recipe.open_study(search, goal, tmp_path, seed=7)


def test_a_resumed_study_does_not_draw_its_first_values_again(tmp_path):
    """Each reopening of a study builds its sampler again from search.seed: seeded per trial
    number, the values of trials 2-3 (second invocation) are not those of trials 0-1."""
    drawn = []

    def objective(trial):
        drawn.append(trial.suggest_float("lr", 1e-4, 1e-1, log=True))
        return drawn[-1]

    for _ in range(2):  # two invocations of the same study
        _, study = quick_study(tmp_path)
        study.optimize(objective, n_trials=2)
    assert len(set(drawn)) == 4, drawn
    (tmp_path / "again").mkdir()
    _, study = quick_study(tmp_path / "again")  # and the same seed draws the same values
    study.optimize(objective, n_trials=4)
    assert drawn[4:] == drawn[:4]


def test_a_trial_claimed_by_other_workers_never_starts(tmp_path):
    """search.trials 2, two trials running on other workers: a third one is surplus, raised
    before any value is sampled; its number is recorded with why."""
    search, study = quick_study(tmp_path)
    others = [study.ask(), study.ask()]
    third = study.ask()
    with pytest.raises(search_recipe.Surplus):
        search_recipe.run_one(third, {}, search, None, tmp_path, total=2)
    assert third.params == {} and "config" not in third.user_attrs
    assert third.user_attrs["failed_why"].startswith("surplus: search.trials 2 already claimed")
    study.tell(third, state=optuna.trial.TrialState.FAIL)  # as optimize records it
    study.tell(others[0], state=optuna.trial.TrialState.FAIL)  # a slot opens again
    fourth = study.ask()
    assert search_recipe.claimed_before(study, fourth.number) == 1  # others[1] only


def test_a_worker_whose_trials_all_fail_stops(tmp_path):
    """A trial that always fails ends the invocation after search.trials attempts instead of
    starting new ones forever (failed trials do not count toward the study's total)."""
    _, study = quick_study(tmp_path)
    calls = []

    def failing(trial):
        calls.append(trial.number)
        raise search_recipe.TrialFailed("no")

    search_recipe.run_trials(study, failing, total=3, seconds=60)
    assert calls == [0, 1, 2]
