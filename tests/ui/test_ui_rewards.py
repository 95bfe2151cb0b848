"""A GRPO run on the dashboard: reward curves from metrics.jsonl and the sampled completions
(completions.jsonl, read from its tail with metrics.jsonl's care: links, non-files, bad and
over-long lines)."""

import json
import os

import pytest
import yaml
from fastapi.testclient import TestClient

from loratune.ui import run_files
from loratune.ui.app import build_app
from test_ui_browser import browser, css, open_page, wait  # noqa: F401 (fixture)
from ui_server import Server

LOCAL = "http://127.0.0.1:7860"
HOSTILE = '<img src=x onerror="document.title=1">'


def sample(step, i, reward=1.0, **extra):
    return {"step": step, "prompt": f"What is {step} + {i}?", "completion": f"{step + i}",
            "reward": reward, "rewards": {"numeric": reward, "regex": 0.0},
            "advantage": 0.5, **extra}


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "runs"
    run = root / "grpo"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"objective": "grpo",
                                                               "max_steps": 3}}))
    metrics = [{"step": 0, "eval_reward": 0.2}] + [
        {"step": s, "loss": 0.1, "reward/numeric/mean": 0.1 * s, "reward/regex/mean": 0.5,
         "reward": 0.2} for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    lines = [json.dumps(sample(1, 0)), "not json", json.dumps([1, 2]),
             json.dumps(sample(2, 0, reward="high")), json.dumps({**sample(2, 1), "step": -1}),
             json.dumps({**sample(2, 2), "rewards": [1.0]}),
             json.dumps(sample(3, 0, completion=HOSTILE)),
             json.dumps({**sample(3, 1), "reward": float("nan"), "extra": "x" * 10})]
    (run / "completions.jsonl").write_text("\n".join(lines) + "\n" + '{"step": 3, "prom')
    return root


@pytest.fixture
def client(root):
    app = build_app(root)
    with TestClient(app, base_url=LOCAL) as c:
        yield c
    app.state.ui.launcher.close()


def test_completions_api_keeps_good_lines_and_names_the_first_bad_one(client):
    got = client.get("/api/runs/grpo/completions").json()
    assert [(s["step"], s["completion"]) for s in got["samples"]] == [
        (1, "1"), (3, HOSTILE), (3, "4")]   # the unfinished last line waits
    assert got["samples"][0] == sample(1, 0)
    assert got["samples"][2]["reward"] is None and "extra" not in got["samples"][2]
    assert got["problem"].startswith("completions.jsonl: not JSON")


def test_a_deeply_nested_completions_line_is_one_bad_line_not_a_500(root, client):
    deep = "[" * 5000   # json.loads raises RecursionError past ~1000 levels
    (root / "grpo" / "completions.jsonl").write_text(
        deep + "\n" + json.dumps(sample(4, 0)) + "\n")
    r = client.get("/api/runs/grpo/completions")
    assert r.status_code == 200
    assert [s["step"] for s in r.json()["samples"]] == [4]
    assert r.json()["problem"].startswith("completions.jsonl: not JSON (nested deeper than")


def test_completions_are_read_from_a_bounded_tail(root, client, monkeypatch):
    monkeypatch.setattr(run_files, "COMPLETIONS_TAIL", 4096)
    path = root / "grpo" / "completions.jsonl"
    with path.open("w") as f:
        f.write("not json" + "y" * 100_000 + "\n")       # before the tail: never read
        for i in range(200):
            f.write(json.dumps(sample(2 + i // 4, i % 4)) + "\n")
    got = client.get("/api/runs/grpo/completions").json()
    assert got["problem"] is None       # nor is the line the tail's start cuts a bad line
    steps = [s["step"] for s in got["samples"]]
    assert steps[-1] == 51 and 0 < len(steps) <= run_files.MAX_SAMPLES
    assert steps == sorted(steps)
    long = sample(9, 0, prompt="p" * 50_000)
    path.write_text(json.dumps(long) + "\n")
    monkeypatch.setattr(run_files, "COMPLETIONS_TAIL", 2**20)
    text = client.get("/api/runs/grpo/completions").json()["samples"][0]["prompt"]
    assert len(text) == run_files.MAX_TEXT


def test_a_link_out_or_a_fifo_is_not_read(root, client):
    path = root / "grpo" / "completions.jsonl"
    path.unlink()
    path.symlink_to("/etc/passwd")
    got = client.get("/api/runs/grpo/completions")
    assert got.status_code == 422 and "link out of the run folder" in got.json()["error"]
    path.unlink()
    os.mkfifo(path)
    got = client.get("/api/runs/grpo/completions")   # would block if it were opened
    assert got.status_code == 422 and "not a plain file" in got.json()["error"]
    path.unlink()
    assert client.get("/api/runs/grpo/completions").json() == {"samples": [], "problem": None}


@pytest.mark.browser
def test_run_page_shows_reward_curves_and_sampled_completions(browser, root):  # noqa: F811
    app = build_app(root)
    server = Server(app)
    try:
        open_page(browser, server, "/run/grpo")
        points = "return [...document.querySelectorAll('#chart-reward polyline')].map(" \
                 "l => [l.dataset.series, +l.dataset.points])"
        series = wait(lambda: dict(browser.execute_script(points)), what="reward curves")
        assert series == {"numeric": 3, "regex": 3, "held-out": 1}
        rows = wait(lambda: css(browser, "#completions tr"), what="completions table")
        assert [th.text for th in css(browser, "#completions th")] == [
            "step", "prompt", "completion", "reward", "numeric", "regex", "advantage"]
        cells = [td.text for td in rows[1].find_elements("css selector", "td")]
        assert cells[:3] == ["3", "What is 3 + 1?", "4"]    # the latest first
        assert HOSTILE in [td.text for td in css(browser, "#completions td")]   # as text
        assert browser.title != "1"
    finally:
        server.stop()
        app.state.ui.launcher.close()
