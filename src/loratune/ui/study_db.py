"""A search's study.db read as the dashboard needs it: each trial's state, parameters, values
and the attributes `loratune search` sets, straight from Optuna's SQLite tables.

report.json is written when a search ends; study.db changes as trials start and finish, so a
study still running is shown from here. The file is opened read-only (an SQLite `mode=ro` URI:
the dashboard can neither change a study nor create a missing file) and only after its header
says SQLite, so a file that is not a database is one clear error, never a half-read page.
Values are parsed as JSON (Optuna stores attributes as JSON text), nothing is unpickled.
"""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path
from urllib.parse import quote

from loratune.ui.run_files import RunFileError, inside

STUDY_DB = "study.db"
SQLITE_HEADER = b"SQLite format 3\x00"
ATTRS = ("planned_gib", "measured_peak_gib", "seconds", "pruned_why", "failed_why")
TIMEOUT_S = 2.0   # a writer holding the lock longer: the page says so, it does not hang


def open_readonly(folder: Path) -> sqlite3.Connection | None:
    """study.db of `folder` opened read-only; None when there is none; RunFileError for a link
    out of the folder, a non-file or a file that is not SQLite."""
    file = inside(folder, STUDY_DB)
    if file is None:
        return None
    try:
        with open(file, "rb") as f:
            header = f.read(len(SQLITE_HEADER))
    except OSError as err:
        raise RunFileError(STUDY_DB, err.strerror or str(err)) from None
    if header != SQLITE_HEADER:
        raise RunFileError(STUDY_DB, "not an SQLite database (no SQLite header)")
    return sqlite3.connect(f"file:{quote(str(file))}?mode=ro", uri=True, timeout=TIMEOUT_S)


def read_study_db(folder: Path) -> dict | None:
    """{"study": its name, "directions": [...], "trials": [{trial, state, params, values (by
    objective index), planned_gib, ...}]} for the study in study.db (the one named `search`
    when it holds several), or None without a study.db."""
    conn = open_readonly(folder)
    if conn is None:
        return None
    try:
        return _read(conn)
    except sqlite3.DatabaseError as err:   # not Optuna's tables, locked, damaged
        raise RunFileError(STUDY_DB, f"not readable as an Optuna study ({err})") from None
    finally:
        conn.close()


def _read(conn: sqlite3.Connection) -> dict:
    studies = conn.execute("SELECT study_id, study_name FROM studies ORDER BY study_id").fetchall()
    if not studies:
        raise RunFileError(STUDY_DB, "holds no study")
    study_id, name = next((s for s in studies if s[1] == "search"), studies[0])
    directions = [d.lower() for (d,) in conn.execute(
        "SELECT direction FROM study_directions WHERE study_id = ? ORDER BY objective",
        (study_id,))]
    trials = {tid: {"trial": number, "state": state.lower(), "params": {}, "values": {}}
              for tid, number, state in conn.execute(
                  "SELECT trial_id, number, state FROM trials WHERE study_id = ? ORDER BY number",
                  (study_id,))}
    _add_params(conn, trials)
    _add_values(conn, trials)
    _add_attrs(conn, trials)
    rows = sorted(trials.values(), key=lambda t: t["trial"])
    for t in rows:
        t["values"] = [t["values"][k] for k in sorted(t["values"])] or None
    return {"study": name, "directions": directions, "trials": rows}


def _ids(trials: dict) -> str:
    return ",".join(str(int(tid)) for tid in trials) or "NULL"


def _add_params(conn, trials: dict) -> None:
    for tid, name, value, dist in conn.execute(
            "SELECT trial_id, param_name, param_value, distribution_json FROM trial_params "
            f"WHERE trial_id IN ({_ids(trials)})"):
        trials[tid]["params"][name] = param_value(value, dist)


def param_value(value: float, dist_json: str):
    """A parameter as it was sampled: Optuna stores a categorical one as the index of its
    choice, an int one as a float."""
    try:
        dist = json.loads(dist_json)
        kind, attrs = dist["name"], dist["attributes"]
        if kind == "CategoricalDistribution":
            return attrs["choices"][int(value)]
        return int(value) if kind in ("IntDistribution", "IntUniformDistribution",
                                      "IntLogUniformDistribution") else value
    except (ValueError, KeyError, IndexError, TypeError):
        raise RunFileError(STUDY_DB, f"trial_params: distribution {dist_json!r:.60} is not "
                           "one Optuna writes") from None


def _add_values(conn, trials: dict) -> None:
    for tid, objective, value in conn.execute(
            "SELECT trial_id, objective, value FROM trial_values "
            f"WHERE trial_id IN ({_ids(trials)})"):
        ok = isinstance(value, (int, float)) and math.isfinite(value)
        trials[tid]["values"][objective] = value if ok else None


def _add_attrs(conn, trials: dict) -> None:
    marks = ",".join("?" * len(ATTRS))
    for tid, key, value_json in conn.execute(
            "SELECT trial_id, key, value_json FROM trial_user_attributes "
            f"WHERE trial_id IN ({_ids(trials)}) AND key IN ({marks})", ATTRS):
        try:
            trials[tid][key] = json.loads(value_json)
        except ValueError:
            raise RunFileError(STUDY_DB, f"trial_user_attributes {key}: not JSON") from None
