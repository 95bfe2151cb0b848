"""loratune search: the search section's checks, the planner pruning infeasible trials before
they start, resuming a stopped study, and best.yaml as a runnable config (tiny model)."""

import json

import pytest
import yaml

from loratune.cli import main
from loratune.config import ConfigError, build_config, load_config
from loratune.recipes import search as search_recipe


@pytest.mark.parametrize("space, named", [
    ({"method": ["lorra"]}, "search.space.method': Value error, unknown method(s) ['lorra']"),
    ({"targets": ["attn"]}, "search.space.targets': Value error, unknown target set(s) ['attn']"),
    ({"lr": {"low": 1e-3, "high": 1e-5}}, "search.space.lr': Value error, range: Value error, "
                                          "low 0.001 must be below high 1e-05"),
    ({"r": {"low": 4}}, "search.space.r': Value error, high: Field required"),
    ({"fields": {"warmup_ratio": [0.1]}}, "'warmup_ratio': expected a dotted path into"),
    ({"dropout": []}, "search.space.dropout': Value error, an empty list of choices"),
])
def test_a_bad_space_names_its_field(space, named):
    with pytest.raises(ConfigError) as err:
        build_config({"search": {"space": space}}, "run.yaml")
    assert "invalid configuration (run.yaml)" in str(err.value) and named in str(err.value)


def test_a_field_path_the_run_config_lacks_fails_before_any_trial(tmp_path, data_file):
    config = tmp_path / "s.yaml"
    config.write_text(json.dumps({"data": {"train": str(data_file), "eval": str(data_file)},
                                  "search": {"space": {"fields": {"train.lrr": [1e-3]}}}}))
    with pytest.raises(ConfigError,
                       match=r"(?s)search.space.fields.train.lrr.*unknown key 'train.lrr'"):
        search_recipe.search_settings(str(config), [])
    config.write_text(json.dumps({"data": {"train": str(data_file)}, "search": {}}))
    with pytest.raises(ConfigError, match="eval_loss needs held-out data: set data.eval"):
        search_recipe.search_settings(str(config), [])
    config.write_text(json.dumps({"data": {"train": str(data_file), "eval": str(data_file)}}))
    with pytest.raises(ConfigError, match="no search section"):
        search_recipe.search_settings(str(config), [])


BIG_SEQ = 8192  # data.max_length the planner puts far above the budget for the tiny model


def search_config(tmp_path, tiny_folder, data_file, trials: int) -> tuple:
    """A 2-step search whose space holds an infeasible half (data.max_length BIG_SEQ), with a
    memory budget halfway between the two planned peaks."""
    base = {"output_dir": str(tmp_path / "study"), "model": {"name": str(tiny_folder)},
            "adapter": {"r": 2, "target_modules": ["q_proj", "v_proj"]},
            "data": {"train": str(data_file), "eval": str(data_file), "max_length": 64},
            "train": {"max_steps": 2, "batch_size": 2, "eval_every": 1}}
    small, _ = search_recipe.planned_gib(build_config(base))
    big, _ = search_recipe.planned_gib(build_config(
        {**base, "data": {**base["data"], "max_length": BIG_SEQ}}))
    assert big > 1.5 * small
    base["search"] = {"space": {"lr": {"low": 1e-3, "high": 1e-1},
                                "fields": {"data.max_length": [64, BIG_SEQ]}},
                      "trials": trials, "memory_gib": (small + big) / 2, "sampler": "random",
                      "seed": 3, "pruner": "none"}
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump(base))
    return config, tmp_path / "study"


def counting_launch(monkeypatch, stop_at: int | None = None) -> list[str]:
    """Record every trial process started; with `stop_at`, that start is interrupted (Ctrl-C)."""
    started, real = [], search_recipe.launch

    def launch(cfg_path, result_path, task=None):
        started.append(cfg_path.parent.name)
        if len(started) == stop_at:
            raise KeyboardInterrupt
        return real(cfg_path, result_path, task)

    monkeypatch.setattr(search_recipe, "launch", launch)
    return started


def test_infeasible_trials_are_pruned_and_never_started(tmp_path, tiny_folder, data_file,
                                                        monkeypatch, capsys):
    config, out = search_config(tmp_path, tiny_folder, data_file, trials=3)
    started = counting_launch(monkeypatch)
    assert main(["search", str(config), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    trials = report["trials"]
    assert [t["state"] for t in trials].count("pruned") >= 1
    assert [t["state"] for t in trials].count("complete") >= 1
    for t in trials:
        big = t["params"]["data.max_length"] == BIG_SEQ
        assert (t["state"] == "pruned") == big
        if big:  # pruned by the planner: the reason, and no process or run folder
            assert t["pruned_why"].startswith(f"planned {t['planned_gib']:.2f} GiB > "
                                              "search.memory_gib")
            assert not (out / "trials" / str(t["trial"])).exists()
        else:
            assert t["eval_loss"] > 0 and t["measured_peak_gib"] > 0.05 and t["seconds"] > 0
    assert started == [f"{t['trial']}.run" for t in trials if t["state"] == "complete"]
    assert "| pruned |" in (out / "report.md").read_text()
    assert "written: " in capsys.readouterr().out


def test_a_stopped_study_resumes_without_rerunning_finished_trials(tmp_path, tiny_folder,
                                                                   data_file, monkeypatch,
                                                                   capsys):
    config, out = search_config(tmp_path, tiny_folder, data_file, trials=3)
    counting_launch(monkeypatch, stop_at=2)  # Ctrl-C as the second trial process starts
    assert main(["search", str(config), "--quiet"]) == 130
    assert f"to continue: loratune search {config}" in capsys.readouterr().err
    import optuna

    study = optuna.load_study(study_name="search", storage=f"sqlite:///{out / 'study.db'}")
    before = {t.number: (t.state.name, t.value) for t in study.trials
              if t.state.name in ("COMPLETE", "PRUNED")}
    assert "COMPLETE" in [s for s, _ in before.values()]
    started = counting_launch(monkeypatch)
    assert main(["search", str(config), "--quiet"]) == 0
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{out / 'study.db'}")
    after = {t.number: (t.state.name, t.value) for t in study.trials}
    assert {n: after[n] for n in before} == before  # kept as they were
    assert not set(started) & {f"{n}.run" for n in before}  # and not run again
    assert sum(s in ("COMPLETE", "PRUNED") for s, _ in after.values()) == 3
    best = load_config(out / "best.yaml")  # a runnable config: no search section
    assert best.search is None and best.output_dir == str(out / "best")
    report = json.loads((out / "report.json").read_text())
    assert best.train.lr == report["trials"][report["best_trial"]]["params"]["lr"]


def test_a_trial_the_pruner_stops_has_its_process_killed(tmp_path):
    """watch(): an intermediate held-out loss the pruner rejects kills the trial's process and
    records why; the last step's loss, written twice, is reported once."""
    import subprocess
    import sys

    import optuna

    metrics = tmp_path / "metrics.jsonl"
    lines = [{"step": 1, "loss": 3.0}, {"step": 2, "eval_loss": 0.5}, {"step": 2, "eval_loss": 0.5}]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in lines))
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=1.0))
    trial = study.ask()
    ok = subprocess.Popen([sys.executable, "-c", "pass"])
    ok.wait()
    search_recipe.watch(trial, ok, metrics)  # 0.5 passes the threshold: no pruning
    assert trial.storage.get_trial(trial._trial_id).intermediate_values == {2: 0.5}
    with metrics.open("a") as f:
        f.write(json.dumps({"step": 4, "eval_loss": 7.25}) + "\n")
    slow = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    with pytest.raises(optuna.TrialPruned):
        search_recipe.watch(trial, slow, metrics)
    assert slow.returncode is not None and slow.returncode < 0  # killed, not finished
    assert trial.user_attrs["pruned_why"] == "held-out loss 7.2500 at step 4 (pruner)"


def test_a_trial_process_ends_when_the_search_is_killed(tmp_path):
    """kill -9 of the search: its trial process (here a stand-in that calls exit_with_parent,
    as train_worker does) ends too instead of training on as an orphan."""
    import os
    import signal
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", f"""
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import os, time; from loratune.recipes.search import "
                  "exit_with_parent; exit_with_parent(0.1); open({str(pid_file)!r}, 'w').write("
                  "str(os.getpid())); time.sleep(60)"])
time.sleep(60)
"""])
    deadline = time.time() + 30
    while not (pid_file.is_file() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    child = int(pid_file.read_text())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    def gone() -> bool:  # exited (a zombie until init reaps it) or reaped
        stat = f"/proc/{child}/stat"
        return not os.path.exists(stat) or open(stat).read().split()[2] == "Z"

    deadline = time.time() + 10
    while time.time() < deadline and not gone():
        time.sleep(0.1)
    if not gone():
        os.kill(child, signal.SIGKILL)
    assert gone()
