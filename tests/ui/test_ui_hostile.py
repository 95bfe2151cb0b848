"""The dashboard against hostile pages and hostile run folders (issue 23): foreign Hosts and
Origins, POSTs without the page's token, launched configs that name files outside the offered
folders, and run folders whose files are wrong, huge or links out of the run."""

import json
import os
import stat
import time
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from loratune.config import RunConfig
from loratune.ui.app import build_app
from loratune.ui.launcher import Launcher

LOCAL = "http://127.0.0.1:7860"


def page_client(app, **kw) -> TestClient:
    """A client as the dashboard's own page: a loopback Host and the page's CSRF token."""
    token = getattr(app.state.ui, "csrf_token", "")
    return TestClient(app, base_url=LOCAL, headers={"X-CSRF-Token": token}, **kw)


def fake_python(tmp_path: Path) -> str:
    """A 'python' that exits at once with code 3: a training run that dies at start."""
    script = tmp_path / "python"
    script.write_text("#!/bin/sh\nexit 3\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "runs"
    good = root / "good"
    good.mkdir(parents=True)
    (good / "config.yaml").write_text(yaml.safe_dump({"adapter": {"method": "dora"}}))
    (good / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.5}) + "\n")
    (good / "status.json").write_text(json.dumps({"state": "interrupted", "step": 1}))
    return root


@pytest.fixture
def app(root, tmp_path):
    app = build_app(root, launcher=Launcher(root, python=fake_python(tmp_path)))
    yield app
    app.state.ui.launcher.close()


def _bad_run(root: Path, files: dict) -> Path:
    run = root / "bad"
    run.mkdir()
    if "config.yaml" not in files:
        (run / "config.yaml").write_text("adapter: {method: lora}\n")
    for name, content in files.items():
        if isinstance(content, tuple):   # ("link", target)
            os.symlink(content[1], run / name)
        else:
            (run / name).write_bytes(content if isinstance(content, bytes)
                                     else content.encode())
    return run


BAD_FILES = {
    "metrics-5": ({"metrics.jsonl": "5\n"}, "metrics.jsonl: line 1: expected a JSON object"),
    "metrics-no-step": ({"metrics.jsonl": '{"loss": 1}\n'}, "metrics.jsonl: line 1: no 'step'"),
    "metrics-seconds": ({"metrics.jsonl": '{"step": 1, "loss": 1, "seconds": "x"}\n'},
                        "metrics.jsonl: line 1: seconds: expected a number"),
    "status-pid-text": ({"status.json": '{"state": "running", "pid": "abc"}'},
                        "status.json: pid: expected a whole number"),
    "status-pid-huge": ({"status.json": json.dumps({"state": "running", "pid": 2**70})},
                        "status.json: pid: expected a process id"),
    "config-adapter-x": ({"config.yaml": "adapter: x\n"},
                         "config.yaml: adapter: expected a mapping"),
    "config-binary": ({"config.yaml": b"\xff\xfe\x00\x01binary\x80"},
                      "config.yaml: not UTF-8 text"),
    "summary-list": ({"run_summary.json": "[1]"}, "run_summary.json: expected a JSON object"),
    "demo-list": ({"demo_report.json": "[1]"}, "demo_report.json: expected a JSON object"),
    "eval-metrics-list": ({"eval-x.json": json.dumps({"task": "x", "headline": "acc", "variants": [
        {"label": "a", "metrics": [1]}]})}, "eval-x.json: variants[0]: metrics: expected a mapping"),
    "dangling-summary": ({"run_summary.json": ("link", "gone.json")},
                         "run_summary.json: a broken link"),
    "loop-metrics": ({"metrics.jsonl": ("link", "metrics.jsonl")}, "metrics.jsonl: a broken link"),
    "config-to-passwd": ({"config.yaml": ("link", "/etc/passwd")},
                         "config.yaml: a link out of the run folder"),
    # json.loads raises RecursionError (not ValueError) past ~1000 levels: was a 500
    "metrics-deep": ({"metrics.jsonl": "[" * 5000 + "\n"},
                     "metrics.jsonl: line 1: not JSON (nested deeper than"),
    "summary-deep": ({"run_summary.json": '{"a": ' * 5000},
                     "run_summary.json: not JSON (nested deeper than"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_one_bad_file_makes_its_run_unreadable_not_the_table(app, root, case):
    files, expected = BAD_FILES[case]
    _bad_run(root, files)
    with page_client(app) as c:
        r = c.get("/api/runs")
        assert r.status_code == 200
        rows = {row["name"]: row for row in r.json()["runs"]}
        assert rows["good"]["state"] == "interrupted" and rows["good"]["last_loss"] == 2.5
        assert rows["bad"]["state"] == "unreadable"
        assert rows["bad"]["unreadable"].startswith(expected), rows["bad"]["unreadable"]
        d = c.get("/api/runs/bad")
        assert d.status_code == 200 and d.json()["state"] == "unreadable"
        assert "root:" not in d.text   # nothing of /etc/passwd


@pytest.mark.parametrize("name", ["dangling", "loop"])
def test_stray_links_in_a_run_folder_leave_it_readable(app, root, name):
    _bad_run(root, {"notes": ("link", "/nonexistent/x" if name == "dangling" else "notes")})
    with page_client(app) as c:
        rows = {row["name"]: row for row in c.get("/api/runs").json()["runs"]}
    assert rows["bad"]["state"] == "failed"   # no status, no checkpoints: readable


def test_loss_png_link_out_of_the_run_is_not_served(app, root):
    _bad_run(root, {"loss.png": ("link", "/etc/passwd")})
    with page_client(app) as c:
        r = c.get("/api/runs/bad/loss.png")
        assert r.status_code == 422 and "link out of the run folder" in r.json()["error"]
        assert "root:" not in r.text
        assert c.get("/api/runs/bad").json()["has_loss_png"] is False


def _events(text):
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in lines:
            out.append((lines["event"], lines["data"]))
    return out


def test_a_50_mb_metrics_line_is_skipped_in_bounded_chunks(app, root):
    run = _bad_run(root, {"status.json": json.dumps({"state": "interrupted", "step": 3})})
    with (run / "metrics.jsonl").open("w") as f:
        f.write(json.dumps({"step": 1, "loss": 3.0}) + "\n")
        f.write('{"step": 2, "loss": 1, "pad": "' + "x" * 50_000_000 + '"}\n')
        f.write(json.dumps({"step": 3, "loss": 1.0}) + "\n")
    with page_client(app) as c:
        t = time.perf_counter()
        events = _events(c.get("/api/runs/bad/metrics").text)
        seconds = time.perf_counter() - t
        row = {r["name"]: r for r in c.get("/api/runs").json()["runs"]}["bad"]
    assert max(len(data) for _, data in events) < 2**20   # no event holds the line
    sent = [r["step"] for name, data in events if name == "metrics" for r in json.loads(data)]
    assert sent == [1, 3] and events[-1][0] == "end"
    assert seconds < 5, seconds
    assert row["unreadable"] == "metrics.jsonl: line 2: longer than 65536 bytes (skipped)"


def test_runs_table_reads_only_what_metrics_gained(app, root, monkeypatch):
    from loratune.ui import run_files

    read = []
    real = run_files.MetricsTail._records
    monkeypatch.setattr(run_files.MetricsTail, "_records",
                        lambda self, data: read.append(len(data)) or real(self, data))
    metrics = root / "good" / "metrics.jsonl"
    with page_client(app) as c:
        c.get("/api/runs")
        assert sum(read) == metrics.stat().st_size
        read.clear()
        line = json.dumps({"step": 2, "loss": 2.0}) + "\n"
        with metrics.open("a") as f:
            f.write(line)
        row = {r["name"]: r for r in c.get("/api/runs").json()["runs"]}["good"]
    assert sum(read) == len(line) and row["step"] == 2 and row["last_loss"] == 2.0


# -- foreign pages ----------------------------------------------------------------------------
def test_cross_origin_text_plain_launch_is_refused_and_starts_nothing(app, root):
    body = json.dumps({"name": "evil", "config": {}})
    with TestClient(app, base_url="http://attacker.example") as c:
        r = c.post("/api/launch", content=body, headers={
            "Origin": "http://evil.com", "Content-Type": "text/plain"})
        assert r.status_code == 421
    with TestClient(app, base_url=LOCAL) as c:   # the same page, its Host spoofed right
        r = c.post("/api/launch", content=body, headers={
            "Origin": "http://evil.com", "Content-Type": "text/plain"})
        assert r.status_code == 403
    assert not (root / "evil").exists() and not app.state.ui.launcher.children


def test_reads_with_a_foreign_host_are_421(app):
    with TestClient(app, base_url="http://attacker.example:7860") as c:
        for path in ("/api/runs", "/api/runs/good", "/", "/api/session"):
            assert c.get(path).status_code == 421, path


def test_posts_without_the_pages_token_are_403(app, root):
    with TestClient(app, base_url=LOCAL) as c:
        r = c.post("/api/launch", json={"name": "x", "config": {}})
        assert r.status_code == 403 and "X-CSRF-Token" in r.json()["error"]
        assert c.post("/api/runs/good/resume").status_code == 403
        assert c.post("/api/plan", json={}, headers={"X-CSRF-Token": "guess"}).status_code == 403
        page = c.get("/").text
        token = page.split('name="csrf-token" content="')[1].split('"')[0]
        assert token == c.get("/api/session").json()["csrf_token"]
        assert c.post("/api/plan", json={"model": "llama-2-7b"},
                      headers={"X-CSRF-Token": token}).status_code == 200
    assert not (root / "x").exists()


@pytest.mark.parametrize("route", ["/api/launch", "/api/plan", "/api/chat"])
@pytest.mark.parametrize("body", [b"not json", b"[1]", b"5", b"\xff\xfe"])
def test_bodies_that_are_not_json_objects_are_400(app, route, body):
    with page_client(app) as c:
        r = c.post(route, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]


# -- launched configs --------------------------------------------------------------------------
@pytest.mark.parametrize("field,config", [
    ("train.deepspeed", {"train": {"deepspeed": "/etc/passwd"}}),
    ("data.train", {"data": {"train": "/etc/passwd"}}),
    ("data.eval", {"data": {"eval": "/etc/passwd"}}),
    ("model.name", {"model": {"name": "/etc"}}),
    ("train.mlflow_uri", {"train": {"mlflow_uri": "http://tracker.example:5000"}}),
    ("train.mlflow_uri", {"train": {"mlflow_uri": "file:///tmp/elsewhere/mlruns"}}),
])
def test_launch_refuses_paths_outside_the_offered_folders(app, root, field, config):
    with page_client(app) as c:
        r = c.post("/api/launch", json={"name": "x", "config": config})
    assert r.status_code == 400 and r.json()["errors"][0]["field"] == field
    assert "--data-root" in r.json()["error"] or "--allow-remote-tracker" in r.json()["error"]
    assert not (root / "x").exists() and not app.state.ui.launcher.children
    logs = root / ".ui-logs"
    assert not logs.exists() or "root:" not in "".join(p.read_text() for p in logs.iterdir())


def test_data_root_and_remote_tracker_are_the_operators_choice(tmp_path):
    from loratune.ui.confine import Confinement

    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("{}\n")
    os.symlink("/etc/passwd", data / "sneaky.jsonl")
    offered = Confinement.of(tmp_path / "runs", [data])
    ok = RunConfig.model_validate({"data": {"train": str(data / "train.jsonl")}})
    assert offered.refusal(ok) is None
    sneaky = RunConfig.model_validate({"data": {"train": str(data / "sneaky.jsonl")}})
    assert offered.refusal(sneaky)[0] == "data.train"   # a link out of the offered folder
    remote = RunConfig.model_validate({"train": {"mlflow_uri": "https://mlflow.example"}})
    assert offered.refusal(remote)[0] == "train.mlflow_uri"
    assert Confinement.of(tmp_path, [data], allow_remote_tracker=True).refusal(remote) is None
    local = RunConfig.model_validate({"train": {"mlflow_uri": f"sqlite:///{data}/m.db"}})
    assert offered.refusal(local) is None


def test_ui_flags_give_allowed_hosts_data_roots_and_remote_trackers(tmp_path):
    from loratune.cli import build_parser
    from loratune.config.commands import UiConfig
    from loratune.flags import config_from_args

    args = build_parser().parse_args(["ui", "--allowed-host", "box.lan", "--allowed-host",
                                      "box", "--data-root", "/data", "--allow-remote-tracker"])
    cfg = config_from_args(UiConfig, args)
    assert cfg.allowed_host == ["box.lan", "box"] and cfg.data_root == ["/data"]
    assert cfg.allow_remote_tracker is True
    app = build_app(tmp_path, allowed_hosts=cfg.allowed_host)
    with TestClient(app, base_url="http://box.lan:7860") as c:
        assert c.get("/api/runs").status_code == 200


def _wait_state(c, name, want, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = {r["name"]: r for r in c.get("/api/runs").json()["runs"]}[name]["state"]
        if state == want:
            return state
        time.sleep(0.2)
    return state


def test_launch_writes_config_as_train_does_keeping_init_from(app, root):
    (root / "sft" / "adapter").mkdir(parents=True)
    config = {"adapter": {"method": "lora", "r": 4, "init_from": str(root / "sft" / "adapter")}}
    with page_client(app) as c:
        r = c.post("/api/launch", json={"name": "dpo", "config": config})
    assert r.status_code == 200, r.text
    written = yaml.safe_load((root / "dpo" / "config.yaml").read_text())
    assert written["adapter"]["init_from"] == str(root / "sft" / "adapter")


def test_a_launched_run_that_dies_at_start_reads_failed(app, root):
    with page_client(app) as c:
        assert c.post("/api/launch", json={"name": "dies", "config": {}}).status_code == 200
        assert _wait_state(c, "dies", "failed") == "failed"   # not a zombie's "running"
        status = c.get("/api/runs/dies").json()["status"]
    assert status["exit_code"] == 3 and "exited with code 3" in status["error"]


def test_resume_holds_the_folders_config_to_the_same_bounds(app, root):
    run = root / "edited"
    run.mkdir()
    (run / "status.json").write_text(json.dumps({"state": "interrupted", "step": 1}))
    cfg = {"output_dir": str(run), "train": {"deepspeed": "/etc/passwd"}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    with page_client(app) as c:
        r = c.post("/api/runs/edited/resume")
        assert r.status_code == 400 and r.json()["errors"][0]["field"] == "train.deepspeed"
        cfg = {"output_dir": str(root.parent / "elsewhere")}
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        r = c.post("/api/runs/edited/resume")
        assert r.status_code == 422 and "output_dir" in r.json()["error"]
    assert not app.state.ui.launcher.children


def test_a_reward_file_outside_the_offered_folders_is_refused(tmp_path):
    from loratune.ui.confine import Confinement

    data, away = tmp_path / "data", tmp_path / "away"
    data.mkdir(), away.mkdir()
    for folder in (data, away):
        (folder / "r.py").write_text("def f(prompts, completions, **kw):\n    return [1.0]\n")
    offered = Confinement.of(tmp_path / "runs", [data])

    def grpo(function):
        return RunConfig.model_validate({"train": {"objective": "grpo", "rl": {"rewards": [
            {"function": "length", "target_length": 5}, {"function": function}]}}})

    assert offered.refusal(grpo(f"{data}/r.py:f")) is None
    assert offered.refusal(grpo(f"{away}/r.py:f"))[0] == "train.rl.rewards.1.function"
    key, why = offered.refusal(grpo("os:system"))
    assert key == "train.rl.rewards.1.function" and "module reward is refused" in why


def test_globs_and_missing_data_paths_are_refused_from_the_dashboard(tmp_path):
    """A `**` glob follows links out of the offered folder; a missing data path would be fetched
    as a Hub dataset id. Both are refused at launch."""
    from loratune.ui.confine import Confinement

    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    offered = Confinement.of(tmp_path / "runs", [data])

    def run(train):
        return RunConfig.model_validate({"data": {"train": train}})

    assert offered.refusal(run(str(data / "train.jsonl"))) is None
    key, why = offered.refusal(run(f"{data}/**/*.jsonl"))
    assert key == "data.train" and "glob is refused" in why
    key, why = offered.refusal(run(f"{data}/owner/name"))
    assert key == "data.train" and "Hub dataset id is refused" in why


def test_every_source_of_a_mixture_is_held_to_the_offered_folders(tmp_path):
    """data.train / data.eval as lists of sources: each source's path is checked, by index."""
    from loratune.ui.confine import Confinement

    data, away = tmp_path / "data", tmp_path / "away"
    for folder in (data, away):
        folder.mkdir()
        (folder / "t.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    offered = Confinement.of(tmp_path / "runs", [data])

    def run(**data_cfg):
        return RunConfig.model_validate({"data": data_cfg})

    inside = [{"path": str(data / "t.jsonl"), "weight": 1}, {"path": "demo", "weight": 1}]
    assert offered.refusal(run(train=inside, eval=[str(data / "t.jsonl")])) is None
    key, why = offered.refusal(run(train=[str(data / "t.jsonl"), str(away / "t.jsonl")]))
    assert key == "data.train.1.path" and "outside the folders" in why
    key, _ = offered.refusal(run(eval=[str(data / "t.jsonl"), f"{away}/t.jsonl"]))
    assert key == "data.eval.1.path"
    key, why = offered.refusal(run(train=[f"{data}/*.jsonl"]))
    assert key == "data.train.0.path" and "glob is refused" in why


def test_a_deeply_nested_compare_report_is_skipped_not_a_500(app, root):
    (root / "good" / "compare.json").write_text("[" * 5000)   # RecursionError in json.loads
    with page_client(app) as c:
        r = c.get("/api/reports")
    assert r.status_code == 200 and r.json()["reports"] == []
