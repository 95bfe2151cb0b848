"""Run metrics: one JSON object per line in metrics.jsonl, and a loss-curve PNG."""

from __future__ import annotations

import json
from pathlib import Path

from loratune.files import write_atomic_file


class MetricsLog:
    """metrics.jsonl, and the experiment trackers (train/trackers.py) fed each same record."""

    def __init__(self, path: Path, enabled: bool = True, trackers: list | None = None):
        self.path = Path(path)
        self.enabled = enabled
        self.trackers = list(trackers or [])

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        for tracker in self.trackers:
            tracker.log(record)

    def close(self, state: str, adapter_dir: Path | None = None) -> None:
        """Tell the trackers how the run ended (finished/interrupted/failed), once."""
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close(state, adapter_dir)

    def truncate_after(self, step: int) -> None:
        """On resume, drop records past the checkpoint so the log has no duplicate steps."""
        if not self.path.is_file():
            return
        text = self.path.read_text(encoding="utf-8", errors="replace")
        lines = text.splitlines()
        if lines and not text.endswith("\n"):
            lines.pop()   # a write the kill cut short: a record past the checkpoint, half of it
        keep = [line for line in lines if line.strip() and _step(line, step) <= step]
        text = "".join(line + "\n" for line in keep)
        write_atomic_file(self.path, lambda tmp: tmp.write_text(text), overwrite=True)


def _step(line: str, default: int) -> int:
    """The step of one log line; `default` (kept) for a line that is no JSON object with one:
    not this log's to delete."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return default
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, (int, float)) else default


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line) if line.strip() else None
        except (ValueError, RecursionError):   # a damaged line: the plot shows the others
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def plot_loss(metrics_path: Path, out_png: Path) -> Path | None:
    """The loss curve; preference runs get a panel with the reward margin and the preference
    accuracy (training and held-out), GRPO runs one with the mean reward per function and the
    held-out reward."""
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in (preference_panel(records), reward_panel(records)) if p[1]]
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(6 + 5 * len(panels), 3.5), dpi=100,
                             squeeze=False)
    ax = axes[0][0]
    ax.plot(*zip(*train), label="train loss", lw=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="held-out loss", lw=1.2)
    ax.set_ylabel("loss")
    _finish_axes(ax)
    for right, (ylabel, curves) in zip(axes[0][1:], panels):
        for label, (points, held_out) in curves.items():
            right.plot(*zip(*points), "o-" if held_out else "-", label=label, lw=1.2)
        right.set_ylabel(ylabel)
        _finish_axes(right)
    fig.tight_layout()
    try:
        write_atomic_file(out_png, lambda tmp: fig.savefig(tmp, format="png"), overwrite=True)
    finally:
        plt.close(fig)
    return out_png


def _finish_axes(ax) -> None:
    ax.set_xlabel("optimizer step")
    ax.grid(alpha=0.3)
    ax.legend()


def _points(records: list[dict], key: str) -> list[tuple]:
    return [(r["step"], r[key]) for r in records if r.get(key) is not None]


def preference_panel(records: list[dict]) -> tuple[str, dict]:
    curves = {label: (_points(records, key), key.startswith("eval_"))
              for key, label in PREFERENCE_CURVES.items()}
    return "", {label: c for label, c in curves.items() if c[0]}


def reward_panel(records: list[dict]) -> tuple[str, dict]:
    """GRPO: reward/<function>/mean per step (metrics keys carry the function's name) and the
    held-out reward (eval_reward, step 0 = before training)."""
    names = dict.fromkeys(k[len("reward/"):-len("/mean")] for r in records for k in r
                          if k.startswith("reward/") and k.endswith("/mean"))
    curves = {name: (_points(records, f"reward/{name}/mean"), False) for name in names}
    if names:
        curves["held-out reward"] = (_points(records, "eval_reward"), True)
    return "reward (mean per function)", {label: c for label, c in curves.items() if c[0]}


PREFERENCE_CURVES = {"margin": "reward margin", "accuracy": "preference accuracy",
                     "eval_margin": "held-out margin", "eval_accuracy": "held-out accuracy"}
