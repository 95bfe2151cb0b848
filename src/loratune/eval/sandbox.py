"""Run untrusted code (a model's completion and its tests) in a separate process.

Each program runs in its own fresh temporary folder, in `python -I -B` (no user site, no
PYTHON* variables, no bytecode written), with an environment of PATH, HOME and TMPDIR only
(the last two: the folder), stdin closed and stdout/stderr to files. Limits:
- RLIMIT_CPU (CPU seconds; the kernel kills the process at the limit), RLIMIT_AS (address
  space), RLIMIT_FSIZE (bytes per file written, stdout and stderr included), RLIMIT_NOFILE;
- a wall-clock timeout, after which the whole process group is killed (a sleep uses no CPU);
- an audit hook (`sandbox_guard.py`), installed before the program runs, that refuses
  sockets (the network, without privileges: no namespace needed), new processes, signals,
  ctypes, `resource.setrlimit`, writes / renames / deletes / directory opens outside the
  folder, and gc/trace introspection; each refusal is reported.

What it does not stop: reading files the user running loratune can read; a determined attack
on the interpreter itself (CPython's docs say audit hooks are not a sandbox: a crafted code
object or a C-level bug can get around them); use of the CPU and memory up to the limits by
`workers` programs at once. It is meant for code a model wrote that is wrong or careless
(loops forever, deletes files, fetches URLs), not for code written to escape. Run untrusted
benchmarks in a container or VM as well when that matters.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

GUARD = Path(__file__).with_name("sandbox_guard.py")
MARK = "loratune-sandbox: refused "


@dataclass(frozen=True)
class Limits:
    timeout: float = 10.0       # wall seconds
    cpu_seconds: int = 5
    memory_mb: int = 1024
    file_mb: int = 16           # largest file written (stdout/stderr too)


@dataclass
class Outcome:
    status: str       # passed | failed | timeout | refused | memory | error
    detail: str       # the refusal, the last line of the error, or ""
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _tail(path: Path, size: int = 4000) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - size))
        return f.read().decode("utf-8", "replace")


def _outcome(code: int | None, stderr: str, timed_out: bool, seconds: float) -> Outcome:
    refusals = [line[len(MARK):] for line in stderr.splitlines() if line.startswith(MARK)]
    last = next((line for line in reversed(stderr.strip().splitlines())), "")
    if refusals:  # even when the program caught the PermissionError and went on
        return Outcome("refused", refusals[0], seconds)
    if timed_out:
        return Outcome("timeout", "wall-clock limit", seconds)
    if code in (-signal.SIGXCPU, -signal.SIGKILL):
        return Outcome("timeout", "CPU-time limit", seconds)
    if "MemoryError" in last:
        return Outcome("memory", "address-space limit", seconds)
    if code == -signal.SIGXFSZ:
        return Outcome("error", "file-size limit", seconds)
    if code == 0:
        return Outcome("passed", "", seconds)
    return Outcome("failed", last or f"exit status {code}", seconds)


def run_program(source: str, limits: Limits = Limits()) -> Outcome:
    """Run `source` as a program in a fresh folder; how it ended."""
    with tempfile.TemporaryDirectory(prefix="loratune-sandbox-") as root:
        root = Path(root)
        folder = root / "work"
        folder.mkdir()
        (folder / "program.py").write_text(source, encoding="utf-8")
        config = json.dumps({"cpu_seconds": limits.cpu_seconds,
                             "memory_bytes": limits.memory_mb * 2**20,
                             "file_bytes": limits.file_mb * 2**20})
        env = {"PATH": os.defpath, "HOME": str(folder), "TMPDIR": str(folder),
               "LANG": "C.UTF-8"}
        start = time.perf_counter()
        with open(root / "stdout", "wb") as out, open(root / "stderr", "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-B", str(GUARD), str(folder), "program.py", config],
                cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True)  # its own process group: killed whole
            timed_out = False
            try:
                proc.wait(timeout=limits.timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        return _outcome(None if timed_out else proc.returncode, _tail(root / "stderr"),
                        timed_out, time.perf_counter() - start)


def run_programs(sources: list[str], limits: Limits = Limits(), workers: int = 2) -> list[Outcome]:
    """Run each source in its own process, `workers` at a time; outcomes in order."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda s: run_program(s, limits), sources))
