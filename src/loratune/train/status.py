"""A run's state in its folder (status.json), and stopping a run cleanly on SIGINT/SIGTERM.

status.json says `running` (with the process id and host), `interrupted` (stopped by a signal,
with the step and checkpoint it stopped at), `failed` (with the error) or `finished`. Besides
`running` at the start, each checkpoint rewrites it; `running`, `interrupted` and `finished`
carry the run's `seconds`, `tokens`, `label_tokens` and `parts` so far, every part counted. A reader
such as `loratune ui` takes `running` with a dead process id as failed (the process was killed
before it could say so).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from loratune.files import write_atomic_file

STATUS_FILE = "status.json"
STATES = ("running", "finished", "interrupted", "failed")


class RunInterrupted(KeyboardInterrupt):
    """The run stopped at a step boundary after SIGINT/SIGTERM, its checkpoint written;
    `totals`: the seconds, tokens and parts of the run up to it (for status.json)."""

    def __init__(self, step: int, checkpoint: Path | None, totals: dict | None = None):
        where = f"; checkpoint {checkpoint}" if checkpoint else ""
        super().__init__(f"stopped at step {step}{where}; --resume continues the run")
        self.step, self.checkpoint, self.totals = step, checkpoint, totals or {}


def write_status(out: Path, state: str, **info) -> None:
    """Write status.json (atomically) with `state` and `info`."""
    record = {"state": state, "pid": os.getpid(), "host": socket.gethostname(),
              "time": round(time.time(), 3), **info}
    text = json.dumps(record, indent=2) + "\n"
    write_atomic_file(Path(out) / STATUS_FILE, lambda tmp: tmp.write_text(text), overwrite=True)


def read_status(out: Path) -> dict | None:
    """status.json's record, or None when the folder has none (or it is unreadable)."""
    try:
        record = json.loads((Path(out) / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("state") in STATES else None


class StopRequest:
    """Set by the first SIGINT/SIGTERM while training; the loop stops after the current step.

    A second signal interrupts at once (the default KeyboardInterrupt)."""

    def __init__(self) -> None:
        self.requested = False

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: stopping after this step (again to stop now)",
              flush=True)


@contextmanager
def stop_on_signal() -> Iterator[StopRequest]:
    """Catch SIGINT and SIGTERM into a StopRequest for the duration (main thread only: a
    signal handler cannot be set elsewhere, so other threads get a request never set)."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {s: signal.signal(s, stop._handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def recorded_outcome(out: Path, enabled: bool, metrics) -> Iterator[None]:
    """Record in status.json and tell the trackers (`metrics.close`) when the body ends by an
    interruption or an error; the exception goes on."""
    try:
        yield
    except KeyboardInterrupt as err:   # RunInterrupted too
        if enabled:
            checkpoint = getattr(err, "checkpoint", None)
            write_status(out, "interrupted", step=getattr(err, "step", None),
                         checkpoint=str(checkpoint) if checkpoint else None,
                         **getattr(err, "totals", {}))
        metrics.close("interrupted")
        raise
    except BaseException as err:
        if enabled:
            write_status(out, "failed", error=f"{type(err).__name__}: {err}")
        metrics.close("failed")
        raise
