"""Run untrusted code (a model's completion and its tests) in a separate, confined process.

The boundary is the operating system's: each program runs under bubblewrap (`bwrap`, Debian
package `bubblewrap`) in new user, PID, network, mount, IPC, UTS and cgroup namespaces, as
`nobody` with no capabilities, in its own session, killed when the evaluator dies
(--die-with-parent). It sees:
- the interpreter, its standard library and the virtual environment, read-only, at their own
  paths (a venv inside the project brings only itself), plus /usr (and the /bin, /lib* links
  to it) and /etc/ld.so.cache; nothing else of the host: not the user's home, the project,
  /etc, /tmp, other processes or the network (only its own loopback);
- /sandbox/work, its working folder (HOME and TMPDIR too): a private tmpfs capped at `disk_mb`
  in all; the program and the guard are bound read-only beside it in /sandbox;
- a seccomp filter (`seccomp.py`, built with libseccomp) that kills it (SIGSYS, reported as
  refused) on fork, device/fifo nodes, non-Unix sockets, pidfds, ptrace, mounts and new
  namespaces. Without libseccomp (Debian `libseccomp2`) it runs without one, with a warning.
Inside, `python -I -B` runs `sandbox_guard.py`, which sets RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE
and RLIMIT_NOFILE, installs an audit hook (a second layer: it names what was refused, it is
not the boundary), runs the program, and only after the program returned prints a random
nonce the evaluator sent on stdin. A program that exits early (sys.exit, os._exit, SystemExit,
a signal) never prints it and fails. A wall-clock timeout kills the whole sandbox.

What it does not stop: use of CPU, memory and the tmpfs up to the limits by `workers`
programs at once; reading what the interpreter's folders and /usr hold; a kernel bug. A
program written to forge a pass can: it runs in the harness's own process, so it can find the
nonce (walk the frames) and print it; the boundary protects the host, not the score.

`sandbox="none"` (`eval --sandbox none`, with a warning) runs the guard without bwrap, in a
temporary folder on the host: the audit hook and the limits only, which code written to
escape gets around (the escapes tested in tests/eval/test_sandbox_escapes.py).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path

GUARD = Path(__file__).with_name("sandbox_guard.py")
MARK = "loratune-sandbox: refused "
DONE = "loratune-sandbox: finished "
INSTALL = "apt-get install bubblewrap"
FOLDER = "/sandbox/work"   # the program's working folder inside bwrap (a capped tmpfs)
NOBODY = "65534"


class SandboxError(ValueError):
    """No usable sandbox; the message says what to install or which flag to pass."""


class UnsandboxedWarning(UserWarning):
    """Generated code runs without the OS boundary (`--sandbox none`)."""


@dataclass(frozen=True)
class Limits:
    timeout: float = 10.0       # wall seconds
    cpu_seconds: int = 5
    memory_mb: int = 1024
    file_mb: int = 16           # largest file written (stdout/stderr too)
    disk_mb: int = 64           # all files in the working folder together (bwrap only)


@dataclass
class Outcome:
    status: str       # passed | failed | timeout | refused | memory | error
    detail: str       # the refusal, the last line of the error, or ""
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def require_sandbox(kind: str) -> None:
    """Refuse to go on without bwrap unless the user chose `none`; warn loudly if so."""
    if kind == "none":
        warnings.warn("--sandbox none: generated code runs on this machine with only an audit "
                      "hook and resource limits, which code written to escape gets around; "
                      f"install bubblewrap ({INSTALL}) and drop --sandbox none",
                      UnsandboxedWarning, stacklevel=2)
        return
    if kind != "bwrap":
        raise SandboxError(f"sandbox (--sandbox): {kind!r} is not bwrap or none")
    if shutil.which("bwrap") is None:
        raise SandboxError(
            "eval --task code runs generated code under bubblewrap, and `bwrap` is not on PATH: "
            f"install it ({INSTALL}), or pass --sandbox none to run the code without an OS "
            "boundary")
    _probe()


@cache
def _probe() -> None:
    """bwrap can make its namespaces here (user namespaces may be disabled)."""
    proc = subprocess.run(_bwrap_args(64 * 2**20) + ["--", sys.executable, "-I", "-c", ""],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise SandboxError(f"bwrap cannot start a sandbox here ({proc.stderr.strip()}): user "
                           "namespaces may be disabled (sysctl kernel.unprivileged_userns_clone"
                           "=1), or pass --sandbox none to run without an OS boundary")


def _read_only() -> list[str]:
    """Binds of /usr, its /bin and /lib* links, and the interpreter's own folders."""
    args = []
    for top in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    seen = ["/usr"]
    for path in sorted({sys.base_prefix, sys.prefix, os.path.realpath(sys.base_prefix)}):
        if not any(path == s or path.startswith(s + "/") for s in seen):
            args += ["--ro-bind", path, path]
            seen.append(path)
    return args + ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]


def _bwrap_args(disk_bytes: int) -> list[str]:
    return ["bwrap", "--unshare-all", "--uid", NOBODY, "--gid", NOBODY, "--cap-drop", "ALL",
            "--die-with-parent", "--new-session", *_read_only(), "--proc", "/proc",
            "--dev", "/dev", "--size", str(disk_bytes), "--tmpfs", FOLDER, "--chdir", FOLDER,
            "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", FOLDER,
            "--setenv", "TMPDIR", FOLDER, "--setenv", "LANG", "C.UTF-8"]


def _command(root: Path, limits: Limits, sandbox: str, seccomp_fd: int | None) -> list[str]:
    config = json.dumps({"cpu_seconds": limits.cpu_seconds,
                         "memory_bytes": limits.memory_mb * 2**20,
                         "file_bytes": limits.file_mb * 2**20})
    if sandbox == "none":
        return [sys.executable, "-I", "-B", str(GUARD), str(root / "work"),
                str(root / "program.py"), config]
    seccomp = ["--seccomp", str(seccomp_fd)] if seccomp_fd is not None else []
    return [*_bwrap_args(limits.disk_mb * 2**20), "--ro-bind", str(GUARD), "/sandbox/guard.py",
            "--ro-bind", str(root / "program.py"), "/sandbox/program.py", *seccomp, "--",
            sys.executable, "-I", "-B", "/sandbox/guard.py", FOLDER, "/sandbox/program.py",
            config]


def _tail(path: Path, size: int = 4000) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - size))
        return f.read().decode("utf-8", "replace")


def _signal_of(code: int | None, sandbox: str) -> int | None:
    """The signal that ended the program (bwrap exits 128 + N when its child got signal N)."""
    if code is None:
        return None
    if code < 0:
        return -code
    return code - 128 if sandbox == "bwrap" and code > 128 else None


def _outcome(code: int | None, stderr: str, finished: bool, timed_out: bool, seconds: float,
             sandbox: str = "bwrap") -> Outcome:
    refusals = [line[len(MARK):] for line in stderr.splitlines() if line.startswith(MARK)]
    last = next((line for line in reversed(stderr.strip().splitlines())), "")
    sig = _signal_of(code, sandbox)
    if refusals:  # even when the program caught the PermissionError and went on
        return Outcome("refused", refusals[0], seconds)
    if timed_out:
        return Outcome("timeout", "wall-clock limit", seconds)
    if sig == signal.SIGSYS:
        return Outcome("refused", "a system call the seccomp filter forbids", seconds)
    if sig in (signal.SIGXCPU, signal.SIGKILL):
        return Outcome("timeout", "CPU-time limit", seconds)
    if "MemoryError" in last:
        return Outcome("memory", "address-space limit", seconds)
    if sig == signal.SIGXFSZ:
        return Outcome("error", "file-size limit", seconds)
    if "No space left on device" in last:
        return Outcome("error", "disk limit (the folder's total size)", seconds)
    if code == 0 and finished:
        return Outcome("passed", "", seconds)
    if code == 0:
        return Outcome("failed", "exited before its tests finished", seconds)
    return Outcome("failed", last or f"exit status {code}", seconds)


def _seccomp_file(root: Path, sandbox: str):
    """An open file holding the compiled filter for `bwrap --seccomp`, or None."""
    from loratune.eval.seccomp import compiled_filter

    if sandbox != "bwrap":
        return None
    program = compiled_filter()
    if program is None:
        warnings.warn("libseccomp not found (apt-get install libseccomp2): generated code runs "
                      "under bwrap without a seccomp filter", UnsandboxedWarning, stacklevel=3)
        return None
    (root / "seccomp.bpf").write_bytes(program)
    return open(root / "seccomp.bpf", "rb")


def _wait(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait for the program, kill its process group (all of the sandbox); whether it timed out."""
    try:
        proc.wait(timeout=timeout)
        return False
    except subprocess.TimeoutExpired:
        return True
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def run_program(source: str, limits: Limits = Limits(), sandbox: str = "bwrap") -> Outcome:
    """Run `source` as a program in a fresh sandbox; how it ended."""
    if sandbox != "none":
        require_sandbox(sandbox)  # raises without a working bwrap, naming the install command
    nonce = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="loratune-sandbox-") as root:
        root = Path(root)
        (root / "work").mkdir()
        (root / "program.py").write_text(source, encoding="utf-8")
        seccomp = _seccomp_file(root, sandbox)
        fds = (seccomp.fileno(),) if seccomp else ()
        start = time.perf_counter()
        with open(root / "stdout", "wb") as out, open(root / "stderr", "wb") as err:
            proc = subprocess.Popen(
                _command(root, limits, sandbox, fds[0] if fds else None), cwd=root / "work",
                env={"PATH": os.defpath, "HOME": str(root / "work"),
                     "TMPDIR": str(root / "work"), "LANG": "C.UTF-8"},
                stdin=subprocess.PIPE, stdout=out, stderr=err, pass_fds=fds,
                start_new_session=True)  # its own process group: killed whole
            try:
                proc.stdin.write(f"{nonce}\n".encode())
                proc.stdin.close()
            except BrokenPipeError:
                pass  # it ended before reading: it did not finish either
            timed_out = _wait(proc, limits.timeout)
        if seccomp:
            seccomp.close()
        finished = f"{DONE}{nonce}" in _tail(root / "stdout", 200)
        return _outcome(None if timed_out else proc.returncode, _tail(root / "stderr"),
                        finished, timed_out, time.perf_counter() - start, sandbox)


def run_programs(sources: list[str], limits: Limits = Limits(), workers: int = 2,
                 sandbox: str = "bwrap") -> list[Outcome]:
    """Run each source in its own sandbox, `workers` at a time; outcomes in order."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda s: run_program(s, limits, sandbox), sources))
