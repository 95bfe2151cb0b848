"""Run folders for the dashboard's tests: one finished (trained for real on a tiny model), one
running (a live process id and a growing metrics.jsonl), one interrupted."""

import json
import socket
import subprocess
import sys
import threading
import time

import pytest
import yaml

from loratune.config import build_config
from loratune.train import train
from loratune.train.status import write_status
from tiny import tiny_llama


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory, smol_tokenizer):
    root = tmp_path_factory.mktemp("runs")
    data = root.parent / f"{root.name}-train.jsonl"
    words = ["apple", "river", "stone", "cloud", "green", "metal", "piano", "tiger"]
    data.write_text("".join(json.dumps({"instruction": f"Repeat the word {w}", "input": "",
                                        "output": f"{w} {w} {w}"}) + "\n" for w in words))
    cfg = build_config({"output_dir": str(root / "done"), "adapter": {"r": 4, "lora_alpha": 8},
                        "data": {"train": str(data), "max_length": 64, "eval_fraction": 0.25},
                        "train": {"max_steps": 6, "batch_size": 2, "lr": 5e-3, "eval_every": 3}})
    train(cfg, model=tiny_llama(vocab=len(smol_tokenizer)), tokenizer=smol_tokenizer, quiet=True)
    # what `loratune demo` and `loratune eval --task` add to a run folder, and a compare report
    (root / "done" / "demo_report.json").write_text(json.dumps({
        "exact_match_before": 0.25, "exact_match_after": 0.75, "samples": [
            {"lang": "en", "prompt": "Repeat the word apple", "reference": "apple apple apple",
             "before": "Apple.", "after": "apple apple apple"}]}))
    (root / "done" / "eval-exact.json").write_text(json.dumps({
        "task": "exact", "headline": "exact_match", "variants": [
            {"label": "base", "metrics": {"exact_match": 0.1}},
            {"label": "adapter", "metrics": {"exact_match": 0.6}}]}))
    from loratune.recipes.compare import write_report

    rows = [{"variant": m, "method": m, "lr": 2e-4, "trainable": t, "trainable_pct": p,
             "score": s, "eval_loss": 1.0, "final_loss": 0.9, "seconds_per_step": 0.5,
             "peak_rss_mib": 900, "mergeable": "yes", "adapter": f"runs/compare/{m}/adapter"}
            for m, t, p, s in [("lora", 4096, 0.13, 0.5), ("ia3", 512, 0.02, 0.25)]]
    (root / "compare").mkdir()
    write_report(rows, root / "compare", "compare")
    stopped = root / "stopped"
    stopped.mkdir()
    (stopped / "config.yaml").write_text(yaml.safe_dump({"adapter": {"method": "ia3"}}))
    (stopped / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n")
    (stopped / "checkpoints" / "step-00000001").mkdir(parents=True)
    write_status(stopped, "interrupted", step=1)
    return root


class FakeRun:
    """A run folder whose 'training' is this object: a live child process and lines appended."""

    def __init__(self, root, name="live"):
        self.path = root / name
        self.path.mkdir()
        (self.path / "config.yaml").write_text(yaml.safe_dump(
            {"adapter": {"method": "dora"}, "train": {"max_steps": 1000}}))
        self.process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        status = {"state": "running", "pid": self.process.pid, "host": socket.gethostname(),
                  "time": time.time(), "total_steps": 1000}
        (self.path / "status.json").write_text(json.dumps(status))
        self.step = 0

    def write(self, n=1):
        with (self.path / "metrics.jsonl").open("a") as f:
            for _ in range(n):
                self.step += 1
                f.write(json.dumps({"step": self.step, "loss": 5.0 / self.step, "lr": 1e-3,
                                    "tokens_per_s": 100.0}) + "\n")

    def stop(self):
        self.process.kill()
        self.process.wait()


@pytest.fixture
def live_run(runs_dir):
    run = FakeRun(runs_dir)
    run.write(3)
    yield run
    run.stop()
    import shutil

    shutil.rmtree(run.path)


@pytest.fixture
def writer(live_run):
    """Appends a metrics line to the live run every 0.2 s while the test runs."""
    done = threading.Event()

    def loop():
        while not done.wait(0.2):
            live_run.write()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    yield live_run
    done.set()
    t.join()
