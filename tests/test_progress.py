"""Progress lines: plain lines when stderr is not a terminal, nothing under --quiet, nothing
for a short wait."""

import time

import pytest

from loratune import progress


@pytest.fixture
def at_once(monkeypatch):
    """Every wait shows at once, every update prints (the real values: 2 s and 5 s)."""
    monkeypatch.setattr(progress, "SHOW_AFTER", 0.0)
    monkeypatch.setattr(progress, "EVERY", 0.0)
    monkeypatch.setattr(progress, "HEARTBEAT", 0.05)
    yield
    progress.set_quiet(False)


def test_a_bar_prints_plain_lines_with_count_rate_and_time_left(at_once, capsys):
    with progress.label("eval base"), progress.bar("generate", 4, "prompts") as bar:
        bar.update(2)
        bar.set_postfix(loss="1.5")
        bar.update(2)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("eval base: generate: 2/4 prompts, ")
    assert "prompts/s" in lines[0] and lines[0].endswith(" s left")
    assert lines[1].startswith("eval base: generate: 4/4 prompts") and "loss=1.5" in lines[1]
    assert lines[-1].startswith("eval base: generate: 4/4 prompts") and " in " in lines[-1]


def test_quiet_and_short_waits_print_nothing(at_once, capsys, monkeypatch):
    progress.set_quiet(True)
    with progress.bar("train", 3, "steps") as bar, progress.stage("loading x"):
        bar.update(3)
        time.sleep(0.1)
    assert capsys.readouterr().err == ""
    progress.set_quiet(False)
    monkeypatch.setattr(progress, "SHOW_AFTER", 60.0)
    with progress.bar("train", 3, "steps") as bar, progress.stage("loading x"):
        bar.update(3)
    assert capsys.readouterr().err == ""


def test_a_stage_says_it_goes_on_and_when_it_ended(at_once, capsys):
    with progress.stage("converting m"):
        time.sleep(0.2)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "converting m ..." and len(lines) >= 3  # then heartbeats
    assert lines[-1].startswith("converting m: done in ")
    with pytest.raises(OSError), progress.stage("writing f", announce=True):
        raise OSError("disk full")
    assert capsys.readouterr().err.splitlines() == ["writing f ..."]  # no "done" for a failure


def test_duration_reads_like_a_clock():
    assert [progress.duration(s) for s in (4.4, 65, 3725)] == ["4 s", "1 min 05 s", "1 h 02 min"]
