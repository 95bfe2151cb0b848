"""What the dashboard reads from a folder of runs: the table, one run, its metrics as they grow.

A run folder is one holding config.yaml (train writes it first); runs may sit one level down
(`compare` and `tune-rank` put theirs in runs/compare/<variant>/). Nothing here writes.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import yaml

from loratune.train.run_folder import DONE_FILE
from loratune.train.status import read_status

REPORTS = ("compare.json", "tune_rank.json")   # what recipes/compare.py writes


class RunNotFound(LookupError):
    pass


def find_runs(root: Path) -> list[Path]:
    """Every run folder in `root` and one level below, by name."""
    found = []
    for child in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (child / "config.yaml").is_file():
            found.append(child)
        else:
            found += [g for g in sorted(child.iterdir())
                      if g.is_dir() and (g / "config.yaml").is_file()]
    return found


def run_path(root: Path, name: str) -> Path:
    """The run folder `name` ('a' or 'compare/lora') names under root; RunNotFound otherwise
    (also for a name that climbs out of root)."""
    path = (root / name).resolve()
    if root.resolve() not in path.parents or not (path / "config.yaml").is_file():
        raise RunNotFound(f"no run {name!r} under {root}")
    return path


def _json(path: Path) -> dict | list | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


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
    checkpoints, else failed)."""
    if (path / DONE_FILE).is_file():
        return "finished"
    status = read_status(path)
    if status is None:
        return "interrupted" if any((path / "checkpoints").glob("step-*")) else "failed"
    if status["state"] == "running":
        here = status.get("host") == socket.gethostname()
        return "running" if not here or _alive(int(status.get("pid", -1))) else "failed"
    return status["state"]


def read_metrics_from(path: Path, offset: int = 0) -> tuple[list[dict], int]:
    """Whole lines of metrics.jsonl from byte `offset`: (records, the offset after them). A line
    still being written (no newline yet) is left for the next read."""
    file = path / "metrics.jsonl"
    try:
        with file.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    records = []
    for line in data[:end].splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue   # a damaged line: skipped, the rest still plotted
    return records, offset + end


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def run_row(root: Path, path: Path) -> dict:
    """One line of the runs table."""
    cfg = _json_or_yaml(path / "config.yaml")
    summary = _json(path / DONE_FILE) or {}
    report = _json(path / "demo_report.json") or {}
    records, _ = read_metrics_from(path)
    losses = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    status = read_status(path) or {}
    train_cfg = cfg.get("train", {})
    return {
        "name": str(path.relative_to(root)),
        "state": run_state(path),
        "method": (cfg.get("adapter") or {}).get("method", "lora"),
        "model": (cfg.get("model") or {}).get("name"),
        "step": losses[-1]["step"] if losses else 0,
        "total_steps": summary.get("steps") or status.get("total_steps")
        or train_cfg.get("max_steps"),
        "last_loss": losses[-1]["loss"] if losses else None,
        "eval_loss": evals[-1]["eval_loss"] if evals else None,
        "score": held_out_score(path, report),
        "seconds": summary.get("train_seconds") or round(sum(r.get("seconds", 0)
                                                             for r in losses), 2),
        "modified": max((p.stat().st_mtime for p in path.iterdir()), default=0),
    }


def eval_reports(path: Path) -> list[dict]:
    """`loratune eval --task` reports in the run folder (eval-<task>.json): each variant's
    headline metric."""
    out = []
    for file in sorted(path.glob("eval-*.json")):
        rep = _json(file)
        if not isinstance(rep, dict) or not isinstance(rep.get("variants"), list):
            continue
        head = rep.get("headline")
        out.append({"task": rep.get("task"), "headline": head,
                    "variants": [{"label": v.get("label"),
                                  "value": (v.get("metrics") or {}).get(head)}
                                 for v in rep["variants"] if isinstance(v, dict)]})
    return out


def held_out_score(path: Path, demo_report: dict) -> float | None:
    """The demo's exact match after training, else the last variant (the adapter; the base
    comes first) of the first eval report."""
    if demo_report.get("exact_match_after") is not None:
        return demo_report["exact_match_after"]
    for rep in eval_reports(path):
        values = [v["value"] for v in rep["variants"] if isinstance(v["value"], (int, float))]
        if values:
            return values[-1]
    return None


def _json_or_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def run_detail(root: Path, name: str) -> dict:
    """The run page: its row, config, summary, status, adapter, samples and reports."""
    from loratune.adapters import method_record

    path = run_path(root, name)
    row = run_row(root, path)
    adapter = path / "adapter"
    try:
        mergeable = method_record(row["method"]).mergeable
    except (KeyError, ValueError):
        mergeable = None
    report = _json(path / "demo_report.json") or {}
    return {
        **row,
        "config": (path / "config.yaml").read_text(encoding="utf-8"),
        "summary": _json(path / DONE_FILE),
        "status": read_status(path),
        "adapter": {"path": str(adapter), "bytes": _folder_bytes(adapter),
                    "exists": (adapter / "adapter_config.json").is_file(),
                    "mergeable": mergeable},
        "samples": report.get("samples", []),
        "evals": eval_reports(path),
        "score_before": report.get("exact_match_before"),
        "checkpoints": sorted(p.name for p in (path / "checkpoints").glob("step-*")),
        "has_loss_png": (path / "loss.png").is_file(),
    }


def find_reports(root: Path) -> list[dict]:
    """The compare / tune-rank reports under root: their rows and the plot beside them."""
    out = []
    for file in sorted(p for name in REPORTS for p in [*root.glob(name), *root.glob(f"*/{name}")]):
        rows = _json(file)
        if isinstance(rows, list):
            png = file.with_suffix(".png")
            out.append({"name": str(file.relative_to(root)), "rows": rows,
                        "plot": str(png.relative_to(root)) if png.is_file() else None})
    return out
