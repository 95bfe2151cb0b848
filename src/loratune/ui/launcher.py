"""Start, stop and resume `loratune train` as a child process of the dashboard.

A launch is a RunConfig validated here (the same class `train` reads, so the form can only
start what train accepts), written as <runs>/<name>/config.yaml, then `loratune train` on it.
Stop is SIGINT: train finishes its step, writes a checkpoint and says `interrupted`; resume is
`train --resume` on the same config. Each start's console goes to <runs>/.ui-logs/<name>.log.
Every config started, launched or resumed, is held to ui/confine.py's bounds first. A thread
per child waits for it, so a child that dies is reaped at once (a zombie's process id would
read as alive) and a run that died before train could say so reads `failed`.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from loratune.config import ConfigError, RunConfig, load_config
from loratune.train.run_folder import check_run_dir, write_config
from loratune.train.status import write_status
from loratune.ui.confine import Confinement
from loratune.ui.run_files import RunFileError, inside, read_run_status
from loratune.ui.runs import run_path, run_state

EXIT_WAIT_S = 30.0   # how long a resume waits for the stopped process of the same run to exit
LOG_TAIL_BYTES = 64 * 2**10   # of a console log, the end the run page shows
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class LaunchError(ValueError):
    """A launch refused: `field` (a dotted config key, or None) and the message for it."""

    def __init__(self, message: str, field: str | None = None, status: int = 400):
        super().__init__(message)
        self.field, self.status = field, status


def field_errors(err: ValidationError) -> list[dict]:
    """pydantic's errors as [{'field': 'train.lr', 'message': ...}] for the form."""
    out = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"])
        message = "unknown key" if e["type"] == "extra_forbidden" else \
            e["msg"].removeprefix("Value error, ")
        out.append({"field": field, "message": message})
    return out


def validate_launch(data: dict) -> RunConfig:
    """The RunConfig `data` describes, or ValidationError."""
    return RunConfig.model_validate(data)


@dataclass
class Child:
    name: str
    process: subprocess.Popen
    log: Path


class Launcher:
    """The training processes this dashboard started (it only stops those)."""

    def __init__(self, root: Path, python: str = sys.executable,
                 confinement: Confinement | None = None):
        self.root, self.python = Path(root).resolve(), python
        self.confinement = confinement or Confinement.of(self.root)
        self.children: dict[str, Child] = {}

    def check(self, cfg: RunConfig) -> None:
        """LaunchError naming the first option of `cfg` out of the dashboard's bounds."""
        refused = self.confinement.refusal(cfg)
        if refused is not None:
            raise LaunchError(refused[1], refused[0])

    def launch(self, name: str, cfg: RunConfig) -> Child:
        """Start run `name` (a folder under root, which output_dir is set to) with `cfg`."""
        if not NAME.match(name):
            raise LaunchError("use letters, digits, '.', '_' and '-' (up to 100)", "name")
        out = self.root / name
        if os.path.lexists(out):
            raise LaunchError(f"{out} exists: choose another name, or resume that run", "name")
        cfg = cfg.model_copy(update={"output_dir": str(out)})
        self.check(cfg)
        check_run_dir(out, resume=False, overwrite=False)
        out.mkdir(parents=True)
        write_config(out, cfg)   # train's own writer: adapter.init_from is kept
        return self._start(name, out, [])

    def resume(self, name: str) -> Child:
        path = run_path(self.root, name)
        state = run_state(path)
        if state not in ("interrupted", "failed"):
            raise LaunchError(f"run {name} is {state}; only an interrupted or failed run "
                              "resumes", status=409)
        # The folder's config may have been edited since: the same bounds as a launch.
        try:
            cfg = load_config(path / "config.yaml")
        except (ConfigError, OSError) as err:
            raise LaunchError(f"run {name}: {err}", status=422) from None
        if Path(os.path.realpath(cfg.output_dir)) != path:
            raise LaunchError(f"run {name}: its config.yaml says output_dir {cfg.output_dir}, "
                              f"not its own folder {path}", "output_dir", status=422)
        self.check(cfg)
        return self._start(name, path, ["--resume"])

    def stop(self, name: str) -> None:
        """SIGINT to the run's process: it stops after its current step, with a checkpoint."""
        child = self.children.get(name)
        if child is None or child.process.poll() is not None:
            raise LaunchError(f"run {name} is not running from this dashboard", status=409)
        child.process.send_signal(signal.SIGINT)

    def _start(self, name: str, out: Path, extra: list[str]) -> Child:
        running = self.children.get(name)
        if running is not None and running.process.poll() is None:
            try:   # a stopped run says `interrupted` a moment before its process exits
                running.process.wait(timeout=EXIT_WAIT_S)
            except subprocess.TimeoutExpired:
                raise LaunchError(f"run {name} is still running", status=409) from None
        logs = self.root / ".ui-logs"
        logs.mkdir(exist_ok=True)
        log = logs / f"{name.replace('/', '__')}.log"
        with log.open("a", encoding="utf-8") as f:
            f.write(f"\n== {time.strftime('%Y-%m-%d %H:%M:%S')} loratune train "
                    f"{' '.join(extra)}\n")
            f.flush()
            process = subprocess.Popen(
                [self.python, "-m", "loratune", "train", str(out / "config.yaml"), *extra],
                stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        # Running from now on (train says so itself once it has set up; a child that dies
        # before that reads as failed, by its process id).
        write_status(out, "running", pid=process.pid, step=None)
        child = Child(name, process, log)
        self.children[name] = child
        threading.Thread(target=reap, args=(child, out), daemon=True).start()
        return child

    def log_tail(self, name: str, lines: int = 40) -> str:
        """The last lines of the run's console log (its last LOG_TAIL_BYTES at most)."""
        try:
            log = inside(self.root / ".ui-logs", f"{name.replace('/', '__')}.log")
        except RunFileError as err:
            return f"(not shown: {err})"
        if log is None:
            return ""
        with open(log, "rb") as f:
            f.seek(max(0, log.stat().st_size - LOG_TAIL_BYTES))
            text = f.read(LOG_TAIL_BYTES).decode("utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def close(self) -> None:
        """Stop every child still running (SIGINT, then wait for its checkpoint)."""
        for child in self.children.values():
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGINT)
        for child in self.children.values():
            try:
                child.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                child.process.kill()


def reap(child: Child, out: Path) -> None:
    """Wait for `child` (reaping it); if status.json still says it is running, say it failed."""
    code = child.process.wait()
    try:
        status = read_run_status(out)
    except RunFileError:
        return
    if status and status["state"] == "running" and status.get("pid") == child.process.pid:
        write_status(out, "failed", pid=child.process.pid, exit_code=code,
                     error=f"loratune train exited with code {code} before it said how it "
                     f"ended: see {child.log}")
