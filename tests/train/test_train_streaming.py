"""Streamed training (data.streaming): the in-memory run when one window holds the file, and a run
killed mid-epoch (SIGKILL) that resumes to the adapter an uninterrupted run saves."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loratune.config import build_config
from loratune.data import DataError
from loratune.train import train
from tiny import tiny_llama

TESTS = Path(__file__).resolve().parents[1]
WORDS = ["apple", "river", "stone", "cloud", "green", "metal", "piano", "tiger", "lemon",
         "candle", "forest", "rocket", "amber", "delta", "ember"]


@pytest.fixture
def data_file(tmp_path):
    rows = [{"instruction": f"Repeat the word {w}", "output": f"{w} " * (1 + i % 5)}
            for i, w in enumerate(WORDS)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(tmp_path, data_file, name, data=None, **train):
    settings = {"max_steps": 10, "batch_size": 2, "grad_accum": 2, "lr": 5e-3,
                "warmup_ratio": 0.0, **train}
    return build_config({
        "output_dir": str(tmp_path / name),
        "adapter": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1},
        "data": {"train": str(data_file), "max_length": 64, **(data or {})},
        "train": settings})


def _run(cfg, tok, **kw):
    return train(cfg, model=tiny_llama(vocab=len(tok)), tokenizer=tok, quiet=True, **kw)


def _adapter(out: Path) -> dict:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _assert_same_adapter(a: Path, b: Path) -> None:
    x, y = _adapter(a), _adapter(b)
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(x[k], y[k], atol=1e-6, rtol=0)


@pytest.mark.parametrize("packing", [True, False])
def test_one_window_trains_as_the_in_memory_run(tmp_path, data_file, smol_tokenizer, packing):
    whole = _run(_cfg(tmp_path, data_file, "whole", {"packing": packing}), smol_tokenizer)
    streamed = _run(_cfg(tmp_path, data_file, "streamed", {"packing": packing,
                                                           "streaming": True}), smol_tokenizer)
    assert [h["loss"] for h in streamed.history] == [h["loss"] for h in whole.history]
    _assert_same_adapter(tmp_path / "whole", tmp_path / "streamed")


def test_resume_mid_epoch_gives_the_uninterrupted_adapter(tmp_path, data_file, smol_tokenizer):
    """The fast stand-in for the SIGKILL test: windows of 4 records, a checkpoint mid-epoch."""
    data = {"streaming": True, "shuffle_buffer": 4, "packing": True}
    full = _run(_cfg(tmp_path, data_file, "full", data), smol_tokenizer)
    cfg = _cfg(tmp_path, data_file, "cut", data, save_every=7, save_total_limit=1)
    _run(cfg, smol_tokenizer)
    out = tmp_path / "cut"
    state = json.loads((out / "checkpoints" / "step-00000007" / "trainer_state.json").read_text())
    position = state["data_position"]
    assert position["used"] > 0 and position["start"] > 0  # mid-window, mid-epoch
    (out / "run_summary.json").unlink()  # as if the run died after the checkpoint
    shutil.rmtree(out / "adapter")
    resumed = _run(cfg, smol_tokenizer, resume=True)
    assert [h["step"] for h in resumed.history] == [8, 9, 10]
    assert [h["loss"] for h in resumed.history] == pytest.approx(
        [h["loss"] for h in full.history[7:]], rel=1e-6)
    _assert_same_adapter(out, tmp_path / "full")


def test_streaming_needs_max_steps_and_its_own_held_out_file(tmp_path, data_file,
                                                             smol_tokenizer):
    cfg = _cfg(tmp_path, data_file, "a", {"streaming": True}, max_steps=None)
    with pytest.raises(ValueError, match="set train.max_steps"):
        _run(cfg, smol_tokenizer)
    cfg = _cfg(tmp_path, data_file, "b", {"streaming": True, "eval_fraction": 0.2})
    with pytest.raises(ValueError, match="give held-out data as data.eval"):
        _run(cfg, smol_tokenizer)


def test_a_streamed_checkpoint_is_not_resumed_reading_whole(tmp_path, data_file,
                                                            smol_tokenizer):
    cfg = _cfg(tmp_path, data_file, "s", {"streaming": True}, max_steps=4, save_every=2)
    _run(cfg, smol_tokenizer)
    (tmp_path / "s" / "run_summary.json").unlink()
    whole = cfg.model_copy(update={"data": cfg.data.model_copy(update={"streaming": False})})
    with pytest.raises(ValueError, match="resume with data.streaming: true"):
        _run(whole, smol_tokenizer, resume=True)
    other = cfg.model_copy(update={"data": cfg.data.model_copy(update={"shuffle_buffer": 3})})
    with pytest.raises(DataError, match="shuffle_buffer: checkpoint 10000, now 3"):
        _run(other, smol_tokenizer, resume=True)


# A training process that stops (and says so in a marker file) once checkpoint `stop_at` is
# written, for the test to kill it there with SIGKILL.
CHILD = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from loratune.config import build_config
from loratune.models import load_tokenizer
from loratune.train import loop, train
from tiny import tiny_llama

cfg = build_config(json.loads(Path(sys.argv[1]).read_text()))
stop_at, resume = int(sys.argv[2]), sys.argv[3] == "resume"
save = loop.save_step_checkpoint

def save_then_wait(run, step, totals):
    save(run, step, totals)
    if step == stop_at:
        Path(sys.argv[4]).write_text(str(step))
        time.sleep(600)

loop.save_step_checkpoint = save_then_wait
tok = load_tokenizer("smollm2-135m-instruct")
train(cfg, model=tiny_llama(vocab=len(tok)), tokenizer=tok, quiet=True, resume=resume)
"""


def _child(tmp_path, cfg, stop_at: int, mode: str, marker: Path) -> subprocess.Popen:
    config = tmp_path / f"{mode}.json"
    config.write_text(json.dumps(cfg.model_dump(mode="json")))
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(TESTS)))
    return subprocess.Popen([sys.executable, str(script), str(config), str(stop_at), mode,
                             str(marker)])


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_adapter(tmp_path, data_file):
    data = {"streaming": True, "shuffle_buffer": 4, "packing": True}
    full = _cfg(tmp_path, data_file, "full", data, max_steps=12)
    cut = _cfg(tmp_path, data_file, "cut", data, max_steps=12, save_every=5)
    marker = tmp_path / "checkpointed"
    first = _child(tmp_path, cut, 5, "fresh", marker)
    uninterrupted = _child(tmp_path, full, -1, "full", tmp_path / "unused")
    deadline = time.monotonic() + 300
    while not marker.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists(), "the run never wrote checkpoint 5"
    os.kill(first.pid, signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL
    assert not (tmp_path / "cut" / "adapter").exists()
    resumed = _child(tmp_path, cut, -1, "resume", tmp_path / "unused")
    assert resumed.wait(timeout=300) == 0 and uninterrupted.wait(timeout=300) == 0
    metrics = [json.loads(line) for line in
               (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, 13))
    _assert_same_adapter(tmp_path / "cut", tmp_path / "full")
