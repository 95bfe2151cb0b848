"""What the dashboard reads of `loratune search` output folders: the list of studies and one
study's page (trials table, score over trials, Pareto front).

A study folder holds report.json (search_report.report_json's shape, written when a search
ends) and/or study.db (Optuna's SQLite, current while trials run: ui/study_db.py). The page
takes each trial from study.db when there is one (its live state) and what only the report
knows (objective names, the Pareto front) from report.json. Every value of report.json is
type-checked: a bad one makes the study "unreadable: report.json: <where>: <what>", never a
broken page; param names and values are sent as JSON text and drawn as text, never as HTML.
"""

from __future__ import annotations

import os
from pathlib import Path

from loratune.ui.run_files import (RunFileError, number, read_json_object, section, short,
                                   text, whole)
from loratune.ui.runs import find_folders, folder_path
from loratune.ui.study_db import ATTRS, STUDY_DB, read_study_db

REPORT = "report.json"
STATES = ("complete", "pruned", "fail", "running", "waiting")


def _is_study(folder: Path) -> bool:
    return os.path.lexists(folder / STUDY_DB) or os.path.lexists(folder / REPORT)


def find_studies(root: Path) -> list[Path]:
    return find_folders(root, _is_study)


def study_path(root: Path, name: str) -> Path:
    return folder_path(root, name, _is_study, "study")


# -- report.json, checked -----------------------------------------------------------------------
def _texts(value, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RunFileError(REPORT, f"{where}: expected a list of text, got {short(value)}")
    return value


def _scalar(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def check_trial(row, i: int, names: list[str]) -> dict:
    """One trials[i] of report.json as the page shows it (its `result` left out)."""
    where = f"{REPORT}: trials[{i}]"
    if not isinstance(row, dict):
        raise RunFileError(REPORT, f"trials[{i}]: expected an object, got {short(row)}")
    out = {"trial": whole(row, "trial", where), "state": text(row, "state", where),
           "pareto": row.get("pareto") is True}
    if out["trial"] is None or out["state"] not in STATES:
        raise RunFileError(REPORT, f"trials[{i}]: expected a trial number and a state "
                           f"({', '.join(STATES)})")
    params = section(row, "params", where)
    if not all(_scalar(v) for v in params.values()):
        raise RunFileError(REPORT, f"trials[{i}].params: expected plain values")
    values = section(row, "values", where)
    out["params"] = params
    out["values"] = [number(values, n, f"{where}.values") for n in names] if values else None
    for key in ATTRS:
        out[key] = (text if key.endswith("_why") else number)(row, key, where)
    return out


def read_report(folder: Path) -> dict | None:
    """report.json with every field the page uses checked; None when there is none."""
    report = read_json_object(folder, REPORT)
    if report is None:
        return None
    names = _texts(report.get("objectives"), "objectives")
    labels = section(report, "labels", REPORT)
    trials = report.get("trials")
    if not isinstance(trials, list):
        raise RunFileError(REPORT, f"trials: expected a list, got {short(trials)}")
    pareto = report.get("pareto") or []
    if not isinstance(pareto, list) or not all(isinstance(p, int) for p in pareto):
        raise RunFileError(REPORT, f"pareto: expected a list of trial numbers, got {short(pareto)}")
    return {"objectives": names,
            "directions": _texts(report.get("directions"), "directions"),
            "labels": [str(labels.get(n) or n) for n in names],
            "best_trial": whole(report, "best_trial", REPORT), "pareto": pareto,
            "trials": [check_trial(t, i, names) for i, t in enumerate(trials)]}


# -- one study ------------------------------------------------------------------------------------
def _from_db(row: dict) -> dict:
    return {"pareto": False, **{k: row.get(k) for k in ATTRS}, **row}


def merged_trials(report: dict | None, db: dict | None) -> tuple[list[dict], int]:
    """(study.db's trials (current), each the report's row where the report has that trial in
    the same state (with its Pareto mark); how many the report lacks or has in another state).
    Without a study.db: the report's trials."""
    reported = {t["trial"]: t for t in (report or {}).get("trials", [])}
    if db is None:
        return list(reported.values()), 0
    out, changed = [], 0
    for row in db["trials"]:
        old = reported.get(row["trial"])
        same = old is not None and old["state"] == row["state"]
        out.append(old if same else _from_db(row))
        changed += not same
    return out, changed


def study_detail(root: Path, name: str) -> dict:
    """The study page: objectives, directions, labels, best trial, Pareto front, trials (each:
    trial, state, params, values in objective order, pareto, planned_gib, measured_peak_gib,
    seconds, pruned_why, failed_why), `live` (read from study.db) and `stale`: how many trials
    report.json lacks or shows in another state (the search is still running)."""
    path = study_path(root, name)
    report, db = read_report(path), read_study_db(path)
    trials, changed = merged_trials(report, db)
    head = report or unnamed_objectives(db)
    return {"name": name, **{k: head[k] for k in ("objectives", "directions", "labels",
                                                   "best_trial", "pareto")},
            "trials": trials, "live": db is not None, "stale": changed if report else 0}


def unnamed_objectives(db: dict) -> dict:
    """A study still in its first search has no report.json: its objectives are known only by
    their directions (study.db does not hold their names)."""
    names = [f"objective {i}" for i in range(len(db["directions"]) or 1)]
    return {"objectives": names, "directions": db["directions"], "labels": names,
            "best_trial": None, "pareto": []}


def study_row(root: Path, path: Path) -> dict:
    """One line of the studies list: trial counts by state and the best trial's values."""
    name = str(path.relative_to(root))
    try:
        detail = study_detail(root, name)
    except RunFileError as err:
        return {"name": name, "unreadable": str(err)}
    counts = {s: sum(t["state"] == s for t in detail["trials"]) for s in STATES}
    best = next((t for t in detail["trials"] if t["trial"] == detail["best_trial"]), None)
    return {"name": name, "objectives": detail["labels"], "counts": counts,
            "best_trial": detail["best_trial"], "best_values": best and best["values"],
            "unreadable": None}
