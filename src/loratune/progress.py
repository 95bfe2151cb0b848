"""Progress on every wait: the one place that prints how far a long step has come.

`bar(...)` counts a known amount of work (steps, prompts, batches): a tqdm bar on a terminal,
elsewhere (a log file, a pipe, CI) a plain line every EVERY seconds with the count, the rate and
the time left. `stage(...)` is a wait of unknown length (loading, converting, merging): a line
when it passes SHOW_AFTER seconds, another every HEARTBEAT seconds, and its time at the end.
A wait shorter than SHOW_AFTER prints nothing; `set_quiet(True)` (`--quiet`) silences all.
Progress goes to stderr, so a command's output on stdout (generate's JSONL, eval's table) stays
what it is.
"""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator

SHOW_AFTER = 2.0   # seconds a wait runs silently before it shows
EVERY = 5.0        # seconds between plain lines of a bar
HEARTBEAT = 10.0   # seconds between the lines of a stage that goes on

_state = {"quiet": False}
_labels: list[str] = []   # what the waits inside `label(...)` belong to ("eval base")


def set_quiet(on: bool) -> None:
    _state["quiet"] = bool(on)


def is_quiet() -> bool:
    return _state["quiet"]


@contextmanager
def label(text: str) -> Iterator[None]:
    """Bars and stages inside read `text: ...` (e.g. which model an eval is scoring)."""
    _labels.append(text)
    try:
        yield
    finally:
        _labels.pop()


def _named(desc: str) -> str:
    return ": ".join([*_labels, desc])


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def duration(seconds: float) -> str:
    """12 s, 3 min 05 s, 1 h 02 min."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Bar:
    """`total` units of work, counted with `update(n)`; use as a context manager (or close())."""

    def __init__(self, desc: str, total: int | None, unit: str = "items", initial: int = 0,
                 enabled: bool = True):
        self.desc, self.total, self.unit = _named(desc), total, unit
        self.initial = self.count = initial
        self.started = time.perf_counter()
        self.shown: float | None = None  # when the last plain line was printed
        self.postfix: dict[str, str] = {}
        self.enabled = enabled and not is_quiet()
        self._tqdm = self._terminal_bar() if self.enabled and sys.stderr.isatty() else None

    def _terminal_bar(self):
        from tqdm import tqdm

        return tqdm(total=self.total, initial=self.initial, desc=self.desc, unit=self.unit,
                    delay=SHOW_AFTER, mininterval=1.0, dynamic_ncols=True, file=sys.stderr)

    def update(self, n: int = 1) -> None:
        self.count += n
        if self._tqdm is not None:
            self._tqdm.update(n)
        elif self.enabled:
            self._maybe_line(final=False)

    def set_postfix(self, **values) -> None:
        """Figures shown after the count (loss=..., lr=...)."""
        self.postfix = {k: str(v) for k, v in values.items()}
        if self._tqdm is not None:
            self._tqdm.set_postfix(self.postfix, refresh=False)

    def _maybe_line(self, final: bool) -> None:
        now = time.perf_counter()
        if self.shown is None and now - self.started < SHOW_AFTER:
            return
        if not final and self.shown is not None and now - self.shown < EVERY:
            return
        self.shown = now
        _say(self.line(now, final))

    def line(self, now: float, final: bool = False) -> str:
        """`desc: 32/128 prompts, 3.10 prompts/s, 31 s left` (`... in 41 s` when done)."""
        elapsed = max(now - self.started, 1e-9)
        rate = (self.count - self.initial) / elapsed
        count = f"{self.count}/{self.total}" if self.total is not None else str(self.count)
        parts = [f"{self.desc}: {count} {self.unit}", f"{rate:.2f} {self.unit}/s"]
        if final:
            parts.append(f"in {duration(elapsed)}")
        elif self.total is not None and rate > 0:
            parts.append(f"{duration((self.total - self.count) / rate)} left")
        parts += [f"{k}={v}" for k, v in self.postfix.items()]
        return ", ".join(parts)

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
        elif self.enabled and self.shown is not None:  # a wait that showed says it ended
            self._maybe_line(final=True)
        self.enabled = False

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bar(desc: str, total: int | None, unit: str = "items", initial: int = 0,
        enabled: bool = True) -> Bar:
    return Bar(desc, total, unit, initial, enabled)


@contextmanager
def stage(what: str, announce: bool = False) -> Iterator[None]:
    """A wait of unknown length: `what ...` once it passes SHOW_AFTER seconds (at once with
    `announce`: a wait known to be long), `what ... N s` every HEARTBEAT seconds after, and
    `what: done in N s` at the end of one that showed."""
    if is_quiet():
        yield
        return
    what, started, done = _named(what), time.perf_counter(), threading.Event()
    shown = threading.Event()

    def beat() -> None:
        wait = 0.0 if announce else SHOW_AFTER
        while not done.wait(wait):
            elapsed = time.perf_counter() - started
            _say(f"{what} ..." + (f" {duration(elapsed)}" if shown.is_set() else ""))
            shown.set()
            wait = HEARTBEAT

    thread = threading.Thread(target=beat, name="loratune-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
    if shown.is_set():
        _say(f"{what}: done in {duration(time.perf_counter() - started)}")
