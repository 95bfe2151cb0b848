"""One run folder's files, read defensively: the dashboard never dies for one bad file.

Anyone who can write into the runs folder decides what these files hold, so each read is
checked: a link is followed only while it stays inside its run folder (a `config.yaml` or
`loss.png` pointing at /etc/passwd is never read or served), only plain files are opened (a FIFO
would block), sizes are capped, and each value the table uses has its type checked. A problem
is a RunFileError naming the file and what was expected; the table shows that run as
"unreadable: <file>: <reason>" and the other runs as usual.

metrics.jsonl can be large and grows while a run trains, so it is read as a tail (MetricsTail):
from a byte offset, a bounded chunk at a time, lines longer than MAX_LINE skipped without ever
being held whole.
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import yaml

from loratune.train.status import STATES, STATUS_FILE

MAX_FILE_BYTES = 4 * 2**20   # a config, summary, status or report larger than this is not ours
MAX_LINE = 64 * 2**10        # train writes metrics lines of a few hundred bytes
CHUNK = 2**20                # bytes of metrics.jsonl read at once (one stream event at most)
PID_MAX = 2**22              # Linux's highest pid_max


class RunFileError(ValueError):
    """A run file the dashboard cannot use: `file` (its name in the run folder) and why."""

    def __init__(self, file: str, reason: str):
        super().__init__(f"{file}: {reason}")
        self.file, self.reason = file, reason


def short(value) -> str:
    text = json.dumps(value) if not isinstance(value, bytes) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def inside(folder: Path, name: str) -> Path | None:
    """The plain file `name` of run folder `folder`, its links resolved; None when there is no
    such entry; RunFileError for a link out of the folder, a broken link or a non-file."""
    entry = folder / name
    if not os.path.lexists(entry):
        return None
    real = os.path.realpath(entry)
    if not real.startswith(os.path.realpath(folder) + os.sep):
        raise RunFileError(name, "a link out of the run folder (not followed)")
    try:
        mode = os.stat(real).st_mode
    except OSError as err:   # a link to nothing, a loop of links
        raise RunFileError(name, f"a broken link ({err.strerror})") from None
    if not stat.S_ISREG(mode):
        raise RunFileError(name, "not a plain file")
    return Path(real)


def read_bytes(folder: Path, name: str, limit: int = MAX_FILE_BYTES) -> bytes | None:
    file = inside(folder, name)
    if file is None:
        return None
    try:
        with open(file, "rb") as f:
            data = f.read(limit + 1)
    except OSError as err:
        raise RunFileError(name, err.strerror or str(err)) from None
    if len(data) > limit:
        raise RunFileError(name, f"larger than {limit} bytes")
    return data


def read_text(folder: Path, name: str) -> str | None:
    data = read_bytes(folder, name)
    try:
        return None if data is None else data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RunFileError(name, f"not UTF-8 text (byte {err.start})") from None


def parse_json(data: bytes | str):
    """json.loads, with too deep a nesting a ValueError like any other bad JSON (json raises
    RecursionError there, which no reader of a run file expects: a 500 for the whole run)."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("nested deeper than Python's recursion limit") from None


def read_json_object(folder: Path, name: str) -> dict | None:
    data = read_bytes(folder, name)
    if data is None:
        return None
    try:
        value = parse_json(data)
    except ValueError as err:   # UnicodeDecodeError included
        raise RunFileError(name, f"not JSON ({err})") from None
    if not isinstance(value, dict):
        raise RunFileError(name, f"expected a JSON object, got {short(value)}")
    return value


def read_yaml_mapping(folder: Path, name: str) -> dict | None:
    text = read_text(folder, name)
    if text is None:
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise RunFileError(name, f"not YAML{where}: {getattr(err, 'problem', None) or err}") \
            from None
    if not isinstance(value, dict):
        raise RunFileError(name, f"expected a mapping of sections, got {short(value)}")
    return value


# -- typed fields of a read object --------------------------------------------------------------
def number(obj: dict, key: str, file: str) -> float | None:
    value = obj.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise RunFileError(file, f"{key}: expected a number, got {short(value)}")
    return value


def whole(obj: dict, key: str, file: str) -> int | None:
    value = obj.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value < 0):
        raise RunFileError(file, f"{key}: expected a whole number >= 0, got {short(value)}")
    return value


def text(obj: dict, key: str, file: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise RunFileError(file, f"{key}: expected text, got {short(value)}")
    return value


def section(obj: dict, key: str, file: str) -> dict:
    value = obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RunFileError(file, f"{key}: expected a mapping, got {short(value)}")
    return value


def read_run_status(folder: Path) -> dict | None:
    """status.json with its fields checked (a pid that os.kill would refuse is refused here)."""
    status = read_json_object(folder, STATUS_FILE)
    if status is None:
        return None
    if status.get("state") not in STATES:
        raise RunFileError(STATUS_FILE, f"state: expected one of {', '.join(STATES)}, "
                           f"got {short(status.get('state'))}")
    pid = whole(status, "pid", STATUS_FILE)
    if pid is not None and not 0 < pid <= PID_MAX:
        raise RunFileError(STATUS_FILE, f"pid: expected a process id (1..{PID_MAX}), got {pid}")
    text(status, "host", STATUS_FILE)
    for key in ("step", "total_steps"):
        whole(status, key, STATUS_FILE)
    return status


# -- metrics.jsonl --------------------------------------------------------------------------------
METRICS = "metrics.jsonl"


def json_object_line(line: bytes) -> dict:
    """One line of a .jsonl run file as a JSON object; ValueError saying what it is instead."""
    try:
        rec = parse_json(line)
    except ValueError as err:
        raise ValueError(f"not JSON ({err})") from None
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {short(rec)}")
    return rec


def metric_record(line: bytes) -> dict:
    """One metrics line as a record: a JSON object, `step` a whole number, every other value a
    number (or null; NaN and infinities become null, which JSON readers accept)."""
    rec = json_object_line(line)
    if "step" not in rec:
        raise ValueError("no 'step'")
    try:
        whole(rec, "step", METRICS)
        for key, value in rec.items():
            number(rec, key, METRICS)
            if isinstance(value, float) and not math.isfinite(value):
                rec[key] = None
    except RunFileError as err:
        raise ValueError(err.reason) from None
    return rec


@dataclass
class MetricsTail:
    """Where a reader of one metrics.jsonl is: the byte offset of its next unread line, lines
    read before it, whether it is inside an over-long line (skipped to its end), the file it
    read (device, inode: a resume replaces the file) and the first bad line found."""

    offset: int = 0
    lines: int = 0
    skipping: bool = False
    identity: tuple[int, int] | None = None
    problem: str | None = None

    def read(self, folder: Path, budget: int = CHUNK) -> tuple[list[dict], bool]:
        """(the valid records of whole lines from the offset, at most `budget` bytes of them;
        whether the file was cut back or replaced since the last read: all is read again).
        A line still being written waits for the next read."""
        file = inside(folder, METRICS)
        if file is None:
            return [], False
        info = file.stat()
        replaced = (self.identity is not None
                    and ((info.st_dev, info.st_ino) != self.identity or info.st_size < self.offset))
        if replaced:
            self.__init__()
        self.identity = (info.st_dev, info.st_ino)
        with open(file, "rb") as f:
            f.seek(self.offset)
            data = f.read(budget)
        return self._records(data), replaced

    def _records(self, data: bytes) -> list[dict]:
        records, pos = [], 0
        while (end := data.find(b"\n", pos)) >= 0:
            line, pos = data[pos:end], end + 1
            self.lines += 1
            if self.skipping or len(line) > MAX_LINE:
                self.skipping = False
                self._bad(f"longer than {MAX_LINE} bytes (skipped)")
            elif line.strip():
                try:
                    records.append(metric_record(line))
                except ValueError as err:
                    self._bad(str(err))
        if self.skipping or len(data) - pos > MAX_LINE:   # inside an over-long line: drop it
            self.skipping, pos = True, len(data)
        self.offset += pos
        return records

    def _bad(self, reason: str) -> None:
        if self.problem is None:
            self.problem = f"line {self.lines}: {reason}"


# -- completions.jsonl (GRPO: sampled completions and their rewards, a few per step) -------------
COMPLETIONS = "completions.jsonl"
COMPLETIONS_TAIL = 256 * 2**10   # bytes read from the end: the latest steps' samples
MAX_SAMPLES = 40                 # samples shown (the latest)
MAX_TEXT = 2000                  # characters kept of a prompt or completion
MAX_REWARDS = 32                 # reward functions per sample


def read_completions(folder: Path) -> dict:
    """{"samples": the latest valid records (oldest first), "problem": the first bad line or
    None}. Only the file's last COMPLETIONS_TAIL bytes are read, however large it grows."""
    file = inside(folder, COMPLETIONS)
    if file is None:
        return {"samples": [], "problem": None}
    size = file.stat().st_size
    with open(file, "rb") as f:
        f.seek(max(0, size - COMPLETIONS_TAIL))
        data = f.read(COMPLETIONS_TAIL)
    lines = data.split(b"\n")[:-1]    # the last piece is "" or a line still being written
    if size > COMPLETIONS_TAIL and lines:
        lines = lines[1:]             # the first was cut by the tail's start
    samples, problem = [], None
    for line in lines:
        try:
            if line.strip():
                samples.append(completion_record(line))
        except ValueError as err:
            problem = problem or f"{COMPLETIONS}: {err} (line skipped)"
    return {"samples": samples[-MAX_SAMPLES:], "problem": problem}


def completion_record(line: bytes) -> dict:
    """One completions line as the run page shows it: step, prompt, completion (text, cut to
    MAX_TEXT), reward and advantage (numbers or null), rewards {function name: number or
    null}. Anything else in the line is dropped."""
    rec = json_object_line(line)
    try:
        if whole(rec, "step", COMPLETIONS) is None:
            raise ValueError("no 'step'")
        out = {"step": rec["step"]}
        for key in ("prompt", "completion"):
            out[key] = (text(rec, key, COMPLETIONS) or "")[:MAX_TEXT]
        for key in ("reward", "advantage"):
            out[key] = finite(number(rec, key, COMPLETIONS))
        out["rewards"] = reward_values(section(rec, "rewards", COMPLETIONS))
    except RunFileError as err:
        raise ValueError(err.reason) from None
    return out


def reward_values(rewards: dict) -> dict:
    if len(rewards) > MAX_REWARDS:
        raise RunFileError(COMPLETIONS, f"rewards: more than {MAX_REWARDS} functions")
    return {name[:100]: finite(number(rewards, name, COMPLETIONS)) for name in rewards}


def finite(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None
