"""The dashboard's JSON API over real run folders (no browser): table, run page, the metrics
stream, launch validation, plan, chat proxy errors, and serve's key rules."""

import json

import pytest
from fastapi.testclient import TestClient

from loratune.config.commands import UiConfig
from loratune.serve.api import startup_api_key
from loratune.ui.app import build_app


LOCAL = "http://127.0.0.1:7860"   # the Host a browser on this machine sends


def local_client(app, **kw) -> TestClient:
    """A client as the dashboard's own page: a loopback Host and the page's CSRF token."""
    return TestClient(app, base_url=LOCAL,
                      headers={"X-CSRF-Token": app.state.ui.csrf_token}, **kw)


@pytest.fixture
def client(runs_dir):
    app = build_app(runs_dir)
    with local_client(app) as c:
        yield c
    app.state.ui.launcher.close()


def _rows(client):
    return {r["name"]: r for r in client.get("/api/runs").json()["runs"]}


def test_runs_table_states_and_figures(client, live_run, runs_dir):
    rows = _rows(client)
    assert rows["done"]["state"] == "finished" and rows["done"]["step"] == 6
    assert rows["done"]["method"] == "lora" and rows["done"]["eval_loss"] is not None
    done_metrics = [json.loads(l) for l in (runs_dir / "done" / "metrics.jsonl").read_text()
                    .splitlines()]
    assert rows["done"]["last_loss"] == [r for r in done_metrics if "loss" in r][-1]["loss"]
    assert rows["live"]["state"] == "running" and rows["live"]["method"] == "dora"
    assert rows["live"]["step"] == 3 and rows["live"]["total_steps"] == 1000
    assert rows["stopped"]["state"] == "interrupted"
    live_run.stop()   # killed without a word: a dead pid reads as failed
    assert _rows(client)["live"]["state"] == "failed"


def test_run_page_has_config_adapter_and_checkpoints(client):
    d = client.get("/api/runs/done").json()
    assert "max_steps: 6" in d["config"]
    assert d["adapter"]["exists"] and d["adapter"]["bytes"] > 1000
    assert d["adapter"]["mergeable"] is True
    assert d["summary"]["steps"] == 6 and d["status"]["state"] == "finished"
    assert d["samples"][0]["after"] == "apple apple apple" and d["score_before"] == 0.25
    assert d["score"] == 0.75   # the demo's figure wins over the eval report's
    assert d["evals"] == [{"task": "exact", "headline": "exact_match", "variants": [
        {"label": "base", "value": 0.1}, {"label": "adapter", "value": 0.6}]}]
    assert client.get("/api/runs/../etc").status_code == 404
    assert client.get("/api/runs/nope").status_code == 404


def _events(text):
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in lines:
            out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_stream_of_a_finished_run_sends_all_and_ends(client, runs_dir):
    events = _events(client.get("/api/runs/done/metrics").text)
    sent = [r for name, data in events if name == "metrics" for r in data]
    assert sent == [json.loads(l) for l in (runs_dir / "done" / "metrics.jsonl").read_text()
                    .splitlines()]
    assert events[-1][0] == "end" and ("state", "finished") in events


def test_stream_of_a_running_run_tails_new_lines_until_it_ends(client, live_run):
    import threading
    import time

    def finish_later():
        time.sleep(0.8)
        live_run.write(2)
        time.sleep(0.8)
        live_run.stop()   # the process is gone: the stream says so and ends

    threading.Thread(target=finish_later).start()
    events = _events(client.get("/api/runs/live/metrics").text)
    batches = [[r["step"] for r in data] for name, data in events if name == "metrics"]
    assert batches[0] == [1, 2, 3] and [4, 5] in batches[1:]
    assert ("state", "running") in events and ("state", "failed") in events
    assert events[-1][0] == "end"


def test_stream_starts_over_when_a_resume_cuts_metrics_back(client, live_run):
    import threading
    import time

    def resume_later():
        time.sleep(0.8)
        lines = (live_run.path / "metrics.jsonl").read_text().splitlines()
        (live_run.path / "metrics.jsonl").write_text(lines[0] + "\n")   # back to step 1
        live_run.step = 1
        live_run.write(1)
        time.sleep(0.8)
        live_run.stop()

    threading.Thread(target=resume_later).start()
    events = _events(client.get("/api/runs/live/metrics").text)
    names = [name for name, _ in events]
    assert "reset" in names
    after = [r["step"] for name, data in events[names.index("reset"):] if name == "metrics"
             for r in data]
    assert after == [1, 2]


def test_launch_refuses_a_bad_field_by_name_and_starts_nothing(client, runs_dir):
    r = client.post("/api/launch", json={"name": "bad", "config": {"train": {"lr": -1}}})
    assert r.status_code == 422
    assert {"field": "train.lr", "message": "Input should be greater than 0"} in \
        r.json()["errors"]
    r = client.post("/api/launch", json={"name": "bad", "config": {
        "adapter": {"method": "ia3", "r": 4}}})
    assert r.json()["errors"][0]["field"] == "adapter" and "has no option 'r'" in \
        r.json()["errors"][0]["message"]
    r = client.post("/api/launch", json={"name": "../out", "config": {}})
    assert r.status_code == 400 and r.json()["errors"][0]["field"] == "name"
    r = client.post("/api/launch", json={"name": "done", "config": {}})
    assert r.status_code == 400 and "exists" in r.json()["error"]
    assert not (runs_dir / "bad").exists() and not (runs_dir.parent / "out").exists()


def test_schema_is_the_run_config_with_one_adapter_schema_per_method(client):
    s = client.get("/api/schema").json()
    assert set(s["run"]["properties"]) == {"model", "data", "train", "eval"}
    assert {"lora", "dora", "ia3", "prompt", "adalora"} <= set(s["adapters"])
    assert "r" in s["adapters"]["lora"]["properties"]
    assert "r" not in s["adapters"]["ia3"]["properties"]


def test_plan_gives_the_breakdown_and_names_a_bad_field(client):
    r = client.post("/api/plan", json={"model": "llama-2-7b", "method": "qlora", "seq": 512})
    b = r.json()["breakdown"]
    assert b["total"] == sum(v for k, v in b.items() if k != "total")
    assert b["weights"] > 3 * 2**30 and "llama-2-7b" in r.json()["report"]
    r = client.post("/api/plan", json={"batch": 0})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "batch"


def test_chat_without_a_server_says_how_to_give_one(client):
    r = client.post("/api/chat", json={"models": ["base"], "messages": [
        {"role": "user", "content": "hi"}]})
    assert "--serve-url" in r.json()["answers"][0]["error"]


def test_stop_and_resume_only_what_they_can(client):
    assert client.post("/api/runs/done/stop").status_code == 409
    r = client.post("/api/runs/done/resume")
    assert r.status_code == 409 and "finished" in r.json()["error"]


def test_api_key_guards_the_api_but_not_the_page(runs_dir):
    with TestClient(build_app(runs_dir, api_key="k3y"), base_url=LOCAL) as c:
        assert c.get("/").status_code == 200
        assert c.get("/api/runs").status_code == 401
        assert c.get("/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/api/runs", headers={"Authorization": "Bearer k3y"}).status_code == 200


def test_ui_has_serves_startup_rules(monkeypatch):
    monkeypatch.delenv("LORATUNE_API_KEY", raising=False)
    assert startup_api_key(UiConfig()) is None
    with pytest.raises(ValueError, match="--host 0.0.0.0 is reachable from other machines") \
            as err:
        startup_api_key(UiConfig(host="0.0.0.0"))
    # the dashboard's risk in its own words (serve's are about adapters)
    assert "start training runs" in str(err.value) and "adapters" not in str(err.value)
    assert startup_api_key(UiConfig(host="0.0.0.0", api_key="x")) == "x"
    with pytest.raises(ValueError, match="--api-key is empty"):
        startup_api_key(UiConfig(api_key=" "))


def test_ui_command_flags_make_a_ui_config():
    from loratune.cli import build_parser
    from loratune.flags import config_from_args

    args = build_parser().parse_args(["ui", "--runs", "r", "--port", "9001",
                                      "--serve-url", "http://127.0.0.1:8000"])
    cfg = config_from_args(UiConfig, args)
    assert (cfg.runs, cfg.port, cfg.serve_url, cfg.host) == ("r", 9001, "http://127.0.0.1:8000",
                                                             "127.0.0.1")


def test_held_out_score_comes_from_an_eval_report_without_a_demo(runs_dir):
    from loratune.ui.runs import held_out_score

    assert held_out_score(runs_dir / "done", {}) == 0.6
    assert held_out_score(runs_dir / "stopped", {}) is None


def test_reports_lists_compare_tables_and_their_plots(client):
    [rep] = client.get("/api/reports").json()["reports"]
    assert rep["name"] == "compare/compare.json" and rep["plot"] == "compare/compare.png"
    assert [r["variant"] for r in rep["rows"]] == ["lora", "ia3"]
    png = client.get("/api/report-plot/compare/compare.png")
    assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
    assert client.get("/api/report-plot/compare/compare.json").status_code == 404
    assert client.get("/api/report-plot/../x.png").status_code == 404


def _get_json(url, timeout=60):
    import time
    import urllib.request

    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return json.loads(resp.read())
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.3)


def test_loratune_ui_command_serves_the_runs_and_stops_on_ctrl_c(runs_dir):
    import signal
    import subprocess
    import sys

    from ui_server import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "loratune", "ui", "--runs", str(runs_dir),
                             "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        rows = _get_json(f"http://127.0.0.1:{port}/api/runs")["runs"]
        assert {r["name"] for r in rows} >= {"done", "stopped"}
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and f"http://127.0.0.1:{port}/" in out


def test_loratune_ui_refuses_an_open_host_without_a_key(runs_dir, monkeypatch):
    import subprocess
    import sys

    monkeypatch.delenv("LORATUNE_API_KEY", raising=False)
    r = subprocess.run([sys.executable, "-m", "loratune", "ui", "--runs", str(runs_dir),
                        "--host", "0.0.0.0"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("loratune ui: error: --host 0.0.0.0 is reachable")


def test_loratune_ui_starts_a_chat_server_over_an_adapters_folder(runs_dir, tiny_folder,
                                                                   tmp_path):
    import shutil
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    from ui_server import free_port

    shutil.copytree(runs_dir / "done" / "adapter", tmp_path / "adapters" / "done")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "loratune", "ui", "--runs", str(runs_dir),
                             "--port", str(port), "--serve-adapters", str(tmp_path / "adapters"),
                             "--serve-model", str(tiny_folder)])
    base = f"http://127.0.0.1:{port}"
    try:
        serve_url = _get_json(f"{base}/api/info")["serve_url"]
        deadline = time.time() + 120
        while "data" not in (models := _get_json(f"{base}/api/models")):
            assert "try again in a moment" in models["error"] and time.time() < deadline
            time.sleep(1)
        ids = {m["id"] for m in models["data"]}
        assert ids == {tiny_folder.name, "done"}
        token = _get_json(f"{base}/api/session")["csrf_token"]
        req = urllib.request.Request(f"{base}/api/chat", method="POST", data=json.dumps({
            "models": sorted(ids), "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4, "temperature": 0}).encode(),
            headers={"Content-Type": "application/json", "X-CSRF-Token": token})
        with urllib.request.urlopen(req, timeout=120) as resp:
            answers = json.loads(resp.read())["answers"]
        assert [a["model"] for a in answers] == sorted(ids)
        assert all("answer" in a and a["usage"]["completion_tokens"] >= 1 for a in answers)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    with pytest.raises(OSError):   # the chat server went with the dashboard
        urllib.request.urlopen(serve_url + "/health", timeout=5)
