"""The dashboard's study pages (issue 32): `loratune search` folders listed, a study's trials
table read from study.db (live) and report.json (objective names, Pareto front), and hostile
study folders: a study.db that is not SQLite, a report with HTML or wrong types, paths out."""

import json
import os
import sqlite3

import pytest
from fastapi.testclient import TestClient

from loratune.ui.app import build_app
from loratune.ui.study_db import open_readonly
from study_folder import make_study

LOCAL = "http://127.0.0.1:7860"


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "runs"
    make_study(root / "search")
    return root


def get(root, path):
    with TestClient(build_app(root), base_url=LOCAL) as client:
        return client.get(path)


def test_study_listed_with_counts_and_best(root):
    rows = get(root, "/api/studies").json()["studies"]
    assert [r["name"] for r in rows] == ["search"]
    row = rows[0]
    assert row["counts"] == {"complete": 3, "pruned": 1, "fail": 0, "running": 1, "waiting": 0}
    assert row["objectives"] == ["held-out loss", "measured peak GiB"]
    assert row["best_trial"] == 1 and row["best_values"] == [1.95, 1.25]   # lowest loss


def test_study_page_trials_from_db_and_pareto_from_report(root):
    page = get(root, "/api/studies/search").json()
    assert page["objectives"] == ["eval_loss", "peak_gib"] and page["live"] is True
    assert page["pareto"] == [1, 2]         # 0 is beaten by 1 on both; 2 has the least memory
    by = {t["trial"]: t for t in page["trials"]}
    assert by[1]["params"] == {"method": "dora", "r": 4, "lr": 3e-3} and by[1]["pareto"]
    assert by[0]["values"] == [2.10, 1.30] and not by[0]["pareto"]
    assert (by[0]["planned_gib"], by[0]["measured_peak_gib"], by[0]["seconds"]) == \
        (pytest.approx(1.2), 1.30, 46.0)
    assert by[3]["state"] == "pruned" and by[3]["pruned_why"].startswith("planned 5.20 GiB")
    # started after report.json was written: only study.db knows it
    assert by[4]["state"] == "running" and by[4]["params"]["method"] == "lora"
    assert by[4]["values"] is None and page["stale"] == 1


def test_study_page_without_report_reads_the_db_alone(root):
    (root / "search" / "report.json").unlink()
    page = get(root, "/api/studies/search").json()
    assert page["objectives"] == ["objective 0", "objective 1"]
    assert page["directions"] == ["minimize", "minimize"]
    assert [t["state"] for t in page["trials"]] == ["complete"] * 3 + ["pruned", "running"]
    assert page["trials"][2]["params"] == {"method": "lora", "r": 8, "lr": 2e-3}


def test_study_db_is_opened_read_only(root):
    conn = open_readonly(root / "search")
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        conn.execute("CREATE TABLE planted (x)")
    conn.close()


def test_study_db_not_sqlite_is_refused_by_name(root):
    (root / "search" / "study.db").write_bytes(b"<html>not a database</html>" * 10)
    row = get(root, "/api/studies").json()["studies"][0]
    assert row["unreadable"] == "study.db: not an SQLite database (no SQLite header)"
    resp = get(root, "/api/studies/search")
    assert resp.status_code == 422 and "study.db: not an SQLite database" in resp.json()["error"]


def test_sqlite_without_optuna_tables_is_refused(root):
    db = root / "search" / "study.db"
    db.unlink()
    sqlite3.connect(db).execute("CREATE TABLE other (x)").connection.commit()
    resp = get(root, "/api/studies/search")
    assert resp.status_code == 422
    assert "study.db: not readable as an Optuna study (no such table: studies)" in resp.json()["error"]


def test_report_param_names_are_text_not_html(root):
    (root / "search" / "study.db").unlink()
    report = json.loads((root / "search" / "report.json").read_text())
    report["trials"][0]["params"] = {"<img src=x onerror=alert(1)>": "<b>lora</b>"}
    (root / "search" / "report.json").write_text(json.dumps(report))
    resp = get(root, "/api/studies/search")
    assert resp.headers["content-type"] == "application/json"
    assert resp.json()["trials"][0]["params"] == {"<img src=x onerror=alert(1)>": "<b>lora</b>"}


@pytest.mark.parametrize("change, where", [
    (lambda r: r["trials"][0].update(values={"eval_loss": "low"}), "trials[0].values: eval_loss"),
    (lambda r: r["trials"][1].update(params={"r": {"nested": 1}}), "trials[1].params"),
    (lambda r: r.update(trials="all"), "trials: expected a list"),
    (lambda r: r["trials"][2].update(state="<script>"), "trials[2]: expected a trial number")])
def test_report_with_wrong_types_names_the_field(root, change, where):
    report = json.loads((root / "search" / "report.json").read_text())
    change(report)
    (root / "search" / "report.json").write_text(json.dumps(report))
    resp = get(root, "/api/studies/search")
    assert resp.status_code == 422 and where in resp.json()["error"]


def test_paths_out_of_the_runs_folder_are_refused(root, tmp_path):
    outside = make_study(tmp_path / "outside", running=False)
    os.symlink(outside, root / "linked")
    assert [r["name"] for r in get(root, "/api/studies").json()["studies"]] == ["search"]
    for name in ("linked", "../outside", "..%2Foutside", "%2E%2E/outside", "/etc"):
        resp = get(root, f"/api/studies/{name}")
        assert resp.status_code == 404, name
    (root / "search" / "study.db").unlink()
    os.symlink(outside / "study.db", root / "search" / "study.db")
    resp = get(root, "/api/studies/search")
    assert resp.status_code == 422 and "study.db: a link out of the run folder" in resp.json()["error"]
