"""What the dashboard reads from a folder of runs: the table, one run, its metrics as they grow.

A run folder is one holding config.yaml (train writes it first); runs may sit one level down
(`compare` and `tune-rank` put theirs in runs/compare/<variant>/). Nothing here writes. Every
file is read through ui/run_files.py: one bad file makes its run "unreadable: <file>: <reason>"
in the table, never the table an error. Linked folders are not listed (a run is what lies in
the runs folder).
"""

from __future__ import annotations

import os
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path

from loratune.train.run_folder import DONE_FILE
from loratune.ui.run_files import (METRICS, MetricsTail, RunFileError, inside, number,
                                   parse_json, read_bytes, read_json_object, read_run_status,
                                   read_text, read_yaml_mapping, section, text, whole)

REPORTS = ("compare.json", "tune_rank.json")   # what recipes/compare.py writes
CONFIG = "config.yaml"
DEMO = "demo_report.json"


class RunNotFound(LookupError):
    pass


def _folders(folder: Path) -> list[Path]:
    """The folders in `folder` by name (not links, not hidden)."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return []
    return [Path(e.path) for e in entries
            if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)]


def _is_run(folder: Path) -> bool:
    return os.path.lexists(folder / CONFIG)   # a bad config.yaml is shown, as unreadable


def find_folders(root: Path, is_kind) -> list[Path]:
    """Every folder in `root` and one level below for which `is_kind` holds, by name (links
    not followed)."""
    found = []
    for child in _folders(root):
        found += [child] if is_kind(child) else [g for g in _folders(child) if is_kind(g)]
    return found


def folder_path(root: Path, name: str, is_kind, kind: str) -> Path:
    """The `kind` folder `name` ('a' or 'compare/lora') names under root; RunNotFound
    otherwise (also for a name that climbs or links out of root)."""
    path = Path(os.path.realpath(root / name))
    if Path(os.path.realpath(root)) not in path.parents or not is_kind(path):
        raise RunNotFound(f"no {kind} {name!r} under {root}")
    return path


def find_runs(root: Path) -> list[Path]:
    """Every run folder in `root` and one level below, by name."""
    return find_folders(root, _is_run)


def run_path(root: Path, name: str) -> Path:
    return folder_path(root, name, _is_run, "run")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's process: alive
        return True
    return True


def run_state(path: Path) -> str:
    """finished, running, interrupted or failed (running with a dead process id: failed, as
    one killed by the OOM killer; a folder from before status.json: interrupted if it holds
    checkpoints, else failed). RunFileError for a bad status.json."""
    if inside(path, DONE_FILE) is not None:
        return "finished"
    status = read_run_status(path)
    if status is None:
        return "interrupted" if any((path / "checkpoints").glob("step-*")) else "failed"
    if status["state"] == "running":
        here = status.get("host") == socket.gethostname()
        pid = status.get("pid")
        return "running" if not here or (pid is not None and _alive(pid)) else "failed"
    return status["state"]


@dataclass
class MetricsSummary:
    """What the table shows of metrics.jsonl, kept up to date by reading only what was
    appended since the last look (all again when a resume replaced the file)."""

    tail: MetricsTail = field(default_factory=MetricsTail)
    step: int = 0
    last_loss: float | None = None
    eval_loss: float | None = None
    seconds: float = 0.0

    def update(self, folder: Path) -> None:
        while True:
            before = self.tail.offset
            records, replaced = self.tail.read(folder)
            if replaced:
                self.step, self.last_loss, self.eval_loss, self.seconds = 0, None, None, 0.0
            for r in records:
                if "loss" in r:
                    self.step, self.last_loss = r["step"], r["loss"]
                    self.seconds += r.get("seconds") or 0
                if r.get("eval_loss") is not None:
                    self.eval_loss = r["eval_loss"]
            if self.tail.offset == before:
                return


class RunTable:
    """The runs under `root`, with each run's metrics summary cached between calls."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._metrics: dict[Path, MetricsSummary] = {}

    def rows(self) -> list[dict]:
        return [self.row(p) for p in find_runs(self.root)]

    def row(self, path: Path) -> dict:
        """One line of the runs table; a run with a bad file says which and why."""
        name = str(path.relative_to(self.root))
        try:
            return {"name": name, **self._figures(path)}
        except RunFileError as err:
            return unreadable_row(name, err, path)

    def metrics(self, path: Path) -> MetricsSummary:
        summary = self._metrics.setdefault(path, MetricsSummary())
        summary.update(path)
        if summary.tail.problem:
            raise RunFileError(METRICS, summary.tail.problem)
        return summary

    def _figures(self, path: Path) -> dict:
        cfg = read_yaml_mapping(path, CONFIG) or {}
        adapter, model, train = (section(cfg, k, CONFIG) for k in ("adapter", "model", "train"))
        summary = read_json_object(path, DONE_FILE) or {}
        status = read_run_status(path) or {}
        m = self.metrics(path)
        return {
            "state": run_state(path),
            "method": text(adapter, "method", CONFIG) or "lora",
            "model": text(model, "name", CONFIG),
            "step": m.step,
            "total_steps": whole(summary, "steps", DONE_FILE) or status.get("total_steps")
            or whole(train, "max_steps", CONFIG),
            "last_loss": m.last_loss,
            "eval_loss": m.eval_loss,
            "score": held_out_score(path, demo_report(path)),
            # train keeps both files' totals across resumed parts; metrics.jsonl holds every
            # step of every part (a resume cuts it back to its checkpoint, then appends)
            "seconds": number(summary, "train_seconds", DONE_FILE)
            or number(status, "train_seconds", "status.json") or round(m.seconds, 2),
            "modified": modified(path),
        }


def unreadable_row(name: str, err: RunFileError, path: Path) -> dict:
    return {"name": name, "state": "unreadable", "unreadable": str(err), "method": None,
            "model": None, "step": 0, "total_steps": None, "last_loss": None,
            "eval_loss": None, "score": None, "seconds": None, "modified": modified(path)}


def modified(path: Path) -> float:
    """The newest change among the run folder's entries (links not followed)."""
    times = []
    for entry in os.scandir(path):
        try:
            times.append(entry.stat(follow_symlinks=False).st_mtime)
        except OSError:
            continue
    return max(times, default=0)


def _folder_bytes(path: Path) -> int:
    """Bytes of the plain files in `path` (links, and folders behind them, not counted)."""
    total = 0
    for folder, _, files in ([] if os.path.islink(path) else os.walk(path)):
        for name in files:
            try:
                info = os.lstat(os.path.join(folder, name))
            except OSError:
                continue
            total += info.st_size if stat.S_ISREG(info.st_mode) else 0
    return total


def demo_report(path: Path) -> dict:
    """demo_report.json's figures and samples, checked."""
    report = read_json_object(path, DEMO) or {}
    for key in ("exact_match_before", "exact_match_after"):
        number(report, key, DEMO)
    samples = report.get("samples") or []
    if not isinstance(samples, list) or not all(isinstance(s, dict) for s in samples):
        raise RunFileError(DEMO, "samples: expected a list of objects")
    for s in samples:
        for key in ("prompt", "reference", "before", "after", "lang"):
            text(s, key, DEMO)
    return report


def eval_reports(path: Path) -> list[dict]:
    """`loratune eval --task` reports in the run folder (eval-<task>.json): each variant's
    headline metric."""
    out = []
    for file in sorted(path.glob("eval-*.json")):
        out.append(_eval_report(path, file.name))
    return [rep for rep in out if rep is not None]


def _eval_report(path: Path, name: str) -> dict | None:
    rep = read_json_object(path, name)
    if rep is None or not isinstance(rep.get("variants"), list):
        return None
    head = text(rep, "headline", name)
    variants = []
    for i, v in enumerate(rep["variants"]):
        if not isinstance(v, dict):
            raise RunFileError(name, f"variants[{i}]: expected an object, got {v!r:.40}")
        metrics = section(v, "metrics", f"{name}: variants[{i}]")
        value = metrics.get(head) if head is not None else None
        variants.append({"label": text(v, "label", name),
                         "value": value if isinstance(value, (int, float))
                         and not isinstance(value, bool) else None})
    return {"task": text(rep, "task", name), "headline": head, "variants": variants}


def held_out_score(path: Path, report: dict) -> float | None:
    """The demo's exact match after training, else the last variant (the adapter; the base
    comes first) of the first eval report."""
    if report.get("exact_match_after") is not None:
        return report["exact_match_after"]
    for rep in eval_reports(path):
        values = [v["value"] for v in rep["variants"] if v["value"] is not None]
        if values:
            return values[-1]
    return None


def run_detail(table: RunTable, name: str) -> dict:
    """The run page: its row, config, summary, status, adapter, samples and reports (only the
    row and what could be read, for an unreadable run)."""
    path = run_path(table.root, name)
    row = table.row(path)
    try:
        return {**row, **_detail(path, row)}
    except RunFileError as err:
        return {**row, **unreadable_row(row["name"], err, path), "config": "", "summary": None,
                "status": None, "adapter": {"path": str(path / "adapter"), "bytes": 0,
                                            "exists": False, "mergeable": None},
                "samples": [], "evals": [], "score_before": None, "checkpoints": [],
                "has_loss_png": False}


def _detail(path: Path, row: dict) -> dict:
    from loratune.adapters import method_record

    adapter = path / "adapter"
    try:
        mergeable = method_record(row["method"]).mergeable
    except (KeyError, ValueError, TypeError):
        mergeable = None
    report = demo_report(path)
    return {
        "config": read_text(path, CONFIG) or "",
        "summary": read_json_object(path, DONE_FILE),
        "status": read_run_status(path),
        "adapter": {"path": str(adapter), "bytes": _folder_bytes(adapter),
                    "exists": inside_or_none(path, "adapter/adapter_config.json") is not None,
                    "mergeable": mergeable},
        "samples": report.get("samples", []),
        "evals": eval_reports(path),
        "score_before": report.get("exact_match_before"),
        "checkpoints": sorted(p.name for p in (path / "checkpoints").glob("step-*")),
        "has_loss_png": inside_or_none(path, "loss.png") is not None,
    }


def inside_or_none(folder: Path, name: str) -> Path | None:
    try:
        return inside(folder, name)
    except RunFileError:
        return None


def find_reports(root: Path) -> list[dict]:
    """The compare / tune-rank reports under root: their rows and the plot beside them."""
    out = []
    for file in sorted(p for name in REPORTS for p in [*root.glob(name), *root.glob(f"*/{name}")]):
        try:
            rows = _report_rows(file.parent, file.name)
        except RunFileError:
            continue   # not a report this page can show
        png = inside_or_none(file.parent, file.with_suffix(".png").name)
        out.append({"name": str(file.relative_to(root)), "rows": rows,
                    "plot": str(file.with_suffix(".png").relative_to(root)) if png else None})
    return out


def _report_rows(folder: Path, name: str) -> list[dict]:
    data = read_bytes(folder, name)
    try:
        rows = parse_json(data) if data is not None else None
    except ValueError as err:
        raise RunFileError(name, f"not JSON ({err})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise RunFileError(name, "expected a list of rows")
    return rows
