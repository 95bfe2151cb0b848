"""status.json and a clean stop on SIGINT/SIGTERM: a checkpoint at the step, resumable exactly."""

import json
import os
import signal

import pytest

from loratune.config import build_config
from loratune.train import train
from loratune.train.status import RunInterrupted, read_status
from tiny import tiny_llama


def _cfg(tmp_path, data_file, name, **train_opts):
    return build_config({
        "output_dir": str(tmp_path / name),
        "adapter": {"r": 4, "lora_alpha": 8},
        "data": {"train": str(data_file), "max_length": 64},
        "train": {"max_steps": 6, "batch_size": 4, "lr": 5e-3, "warmup_ratio": 0.0,
                  **train_opts},
    })


def _run(cfg, tok, **kw):
    return train(cfg, model=tiny_llama(vocab=len(tok)), tokenizer=tok, quiet=True, **kw)


class _SignalAt:
    """A tracker that sends this process `signum` once step `step` is logged."""

    def __init__(self, step: int, signum: int = signal.SIGINT, times: int = 1):
        self.step, self.signum, self.times = step, signum, times

    def log(self, record):
        if record["step"] == self.step:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)

    def close(self, state, adapter_dir):
        self.closed = state


def _with_tracker(monkeypatch, tracker):
    import loratune.train.loop as loop

    monkeypatch.setattr(loop, "open_trackers", lambda cfg, out: [tracker])


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_at_the_step_with_a_checkpoint_and_resume_matches(
        tmp_path, data_file, smol_tokenizer, monkeypatch, signum):
    before = signal.getsignal(signal.SIGINT)   # SIG_IGN when pytest runs as a background job
    full = _run(_cfg(tmp_path, data_file, "full"), smol_tokenizer)
    tracker = _SignalAt(3, signum)
    _with_tracker(monkeypatch, tracker)
    cfg = _cfg(tmp_path, data_file, "cut")
    with pytest.raises(RunInterrupted, match="stopped at step 3"):
        _run(cfg, smol_tokenizer)
    out = tmp_path / "cut"
    status = read_status(out)
    assert status["state"] == "interrupted" and status["step"] == 3
    assert status["checkpoint"].endswith("step-00000003")
    assert (out / "checkpoints" / "step-00000003" / "trainer_state.json").is_file()
    assert not (out / "run_summary.json").exists()
    assert tracker.closed == "interrupted"
    # the handlers are put back: a later SIGINT does what it did before (a KeyboardInterrupt
    # in a terminal)
    assert signal.getsignal(signal.SIGINT) is before
    monkeypatch.undo()
    resumed = _run(cfg, smol_tokenizer, resume=True)
    assert [h["step"] for h in resumed.history] == [4, 5, 6]
    assert [h["loss"] for h in resumed.history] == pytest.approx(
        [h["loss"] for h in full.history[3:]], rel=1e-5)
    assert read_status(out)["state"] == "finished"
    assert_both_parts_counted(out, status, full)


def assert_both_parts_counted(out, stopped: dict, full):
    """run_summary.json and status.json count the steps, tokens and seconds of both parts: the
    tokens of an uncut run, the first part's seconds and more."""
    summary = json.loads((out / "run_summary.json").read_text())
    finished = read_status(out)
    assert stopped["parts"] == 1 and stopped["tokens"] == sum(h["tokens"] for h in
                                                              full.history[:3])
    assert summary["steps"] == 6 and summary["parts"] == finished["parts"] == 2
    assert summary["tokens"] == finished["tokens"] == full.tokens
    assert summary["label_tokens"] == full.label_tokens
    assert summary["train_seconds"] > stopped["seconds"] > 0
    assert summary["train_seconds"] == finished["seconds"]


def test_a_second_signal_interrupts_at_once(tmp_path, data_file, smol_tokenizer, monkeypatch):
    _with_tracker(monkeypatch, _SignalAt(2, times=2))
    with pytest.raises(KeyboardInterrupt) as err:
        _run(_cfg(tmp_path, data_file, "now"), smol_tokenizer)
    assert not isinstance(err.value, RunInterrupted)
    status = read_status(tmp_path / "now")
    assert status["state"] == "interrupted" and status["checkpoint"] is None


def test_a_failing_run_says_failed_with_the_error(tmp_path, data_file, smol_tokenizer,
                                                  monkeypatch):
    class Broken(_SignalAt):
        def log(self, record):
            if record["step"] == 2:
                raise OSError("disk full")

    _with_tracker(monkeypatch, Broken(2))
    with pytest.raises(OSError):
        _run(_cfg(tmp_path, data_file, "bad"), smol_tokenizer)
    status = read_status(tmp_path / "bad")
    assert status["state"] == "failed" and "disk full" in status["error"]
    assert status["pid"] == os.getpid()


def test_running_status_is_written_at_the_start(tmp_path, data_file, smol_tokenizer,
                                                monkeypatch):
    seen = []

    class Look(_SignalAt):
        def log(self, record):
            seen.append(read_status(tmp_path / "look"))

    _with_tracker(monkeypatch, Look(0))
    _run(_cfg(tmp_path, data_file, "look", max_steps=2), smol_tokenizer)
    assert seen[0]["state"] == "running" and seen[0]["total_steps"] == 2
    assert json.loads((tmp_path / "look" / "status.json").read_text())["state"] == "finished"
