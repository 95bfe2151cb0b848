"""A real Optuna study in a folder, as `loratune search` leaves one (study.db and report.json,
report.json made by search_report.report_json), without training anything."""

import json
from pathlib import Path

import optuna

from loratune.recipes.search import Goal
from loratune.recipes.search_report import report_json

# (method, r, lr, held-out loss, measured GiB) of the complete trials; trial 3 is pruned
TRIALS = [("lora", 16, 1e-3, 2.10, 1.30), ("dora", 4, 3e-3, 1.95, 1.25),
          ("lora", 8, 2e-3, 2.30, 1.20)]


def add_trial(study, params: dict, state="complete", values=None, **attrs):
    study.enqueue_trial(params)
    trial = study.ask()
    trial.suggest_categorical("method", ["lora", "dora"])
    trial.suggest_int("r", 4, 16)
    trial.suggest_float("lr", 1e-4, 1e-2, log=True)
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
    if state == "complete":
        study.tell(trial, values)
    elif state == "pruned":
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    return trial


def make_study(folder: Path, running: bool = True) -> Path:
    """Three complete trials (two objectives: held-out loss, peak GiB), one pruned by the
    planner, report.json written; then (running=True) one trial started after the report."""
    folder.mkdir(parents=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=f"sqlite:///{folder / 'study.db'}", study_name="search",
                                directions=["minimize", "minimize"])
    for method, r, lr, loss, gib in TRIALS:
        add_trial(study, {"method": method, "r": r, "lr": lr}, values=[loss, gib],
                  planned_gib=gib - 0.1, measured_peak_gib=gib, seconds=30.0 + r)
    add_trial(study, {"method": "dora", "r": 16, "lr": 1e-3}, state="pruned",
              planned_gib=5.2, pruned_why="planned 5.20 GiB > search.memory_gib 4")
    goal = Goal(("eval_loss", "peak_gib"), ("minimize", "minimize"))
    (folder / "report.json").write_text(json.dumps(report_json(study, goal)))
    if running:
        add_trial(study, {"method": "lora", "r": 4, "lr": 5e-4}, state="running", planned_gib=1.1)
    return folder
