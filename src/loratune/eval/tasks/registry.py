"""The tasks `loratune eval --task NAME` runs: one `TaskRecord` per task, looked up by name.

Adding a task is a one-file job: write `src/loratune/eval/tasks/<name>.py` with

    def read(cfg: EvalCommandConfig) -> TaskData       # parse and hash the data, once
    def score(model, tokenizer, data, cfg) -> TaskResult   # run on the active adapters

and end it with `register(TaskRecord(name=..., summary=..., read=read, score=score,
headline=..., options=(...)))`; then add the module's name to `BUILTIN` in `tasks/__init__.py`
(a task defined outside the package only calls `register` before `loratune.cli.main`). The
runner evaluates the base and each adapter with the same `data` and writes the report; a task
never loads a model or writes a file itself. Options are fields of `EvalCommandConfig`: name
the ones a task reads in `options` (the report records them); a new option is a new field there.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


class TaskError(ValueError):
    """A task that does not exist, or options it cannot take; the message names the flag."""


@dataclass
class TaskData:
    """A task's parsed input: the items and the files they came from (hashed for the report)."""

    items: list
    files: dict[str, str]                     # path -> sha256 of its bytes
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskResult:
    """One model's scores on a task."""

    metrics: dict[str, float]                 # overall, e.g. {"acc": 0.5, "acc_norm": 0.75}
    n: int                                    # items scored
    seconds: float = 0.0
    groups: dict[str, dict[str, float]] = field(default_factory=dict)  # per subject / problem
    rows: list[dict] = field(default_factory=list)                      # per item
    notes: list[str] = field(default_factory=list)

    @property
    def items_per_second(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class TaskRecord:
    """Every fact about one task that the runner, the report and `compare` need."""

    name: str
    summary: str                              # one line, shown in `--task` help and errors
    read: Callable[[Any], TaskData]           # (EvalCommandConfig) -> TaskData
    score: Callable[..., TaskResult]          # (model, tokenizer, TaskData, cfg) -> TaskResult
    headline: str                             # the metric `compare` and the summary line show
    options: tuple[str, ...] = ()             # EvalCommandConfig fields the task reads
    # metric -> format in the Markdown table; unlisted metrics print with {:.4f}
    formats: dict[str, str] = field(default_factory=dict)
    # the metrics that are better lower (perplexity); every other one is better higher
    lower_better: tuple[str, ...] = ()


_TASKS: dict[str, TaskRecord] = {}


def register(record: TaskRecord) -> TaskRecord:
    if record.name in _TASKS and _TASKS[record.name] is not record:
        raise TaskError(f"task {record.name!r} is already registered")
    _TASKS[record.name] = record
    return record


def unregister(name: str) -> None:
    _TASKS.pop(name, None)


def task_names() -> list[str]:
    return list(_TASKS)


def task_record(name: str) -> TaskRecord:
    try:
        return _TASKS[name]
    except KeyError:
        raise TaskError(f"--task {name!r}: no such task; expected one of "
                        f"{', '.join(_TASKS)}") from None


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hashed(*paths: str | Path | None) -> dict[str, str]:
    """{path: sha256} of the files given (folders: every file in them, sorted)."""
    out = {}
    for path in filter(None, paths):
        path = Path(path)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        out.update({str(p): sha256_file(p) for p in files})
    return out


class Timer:
    """Seconds spent inside `with timer:` blocks, summed (scoring only, not reading)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __enter__(self):
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds += time.perf_counter() - self._start
