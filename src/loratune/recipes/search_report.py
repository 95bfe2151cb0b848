"""What `loratune search` writes beside its study: report.json (report_json: the one place its
shape is made), report.md, pareto.png and best.yaml, each temp-then-rename.

best.yaml is the chosen Pareto point: of the trials no other beats on every objective, the one
best on the first objective (ties: on the next ones, in order). With one objective that is the
best trial.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from loratune.files import write_atomic_file

# objective -> its column heading in report.md and its axis in pareto.png
LABELS = {"eval_loss": "held-out loss", "reward": "held-out reward", "task": "task",
          "peak_gib": "measured peak GiB", "seconds": "training s"}


def label(name: str, goal) -> str:
    return f"{goal.task['task']} {goal.metric}" if name == "task" else LABELS[name]


def pareto_front(study, goal) -> list:
    """The complete trials no other complete trial beats on every objective (Optuna's), the
    chosen one first (see the module's docstring), then by trial number."""
    front = study.best_trials
    if not front:
        return []
    signs = [1 if d == "minimize" else -1 for d in goal.directions]
    chosen = min(front, key=lambda t: ([s * v for s, v in zip(signs, t.values)], t.number))
    return [chosen] + sorted((t for t in front if t is not chosen), key=lambda t: t.number)


def trial_rows(study, goal) -> list[dict]:
    front = {t.number for t in pareto_front(study, goal)}
    rows = []
    for t in study.get_trials(deepcopy=False):
        attrs = t.user_attrs
        values = dict(zip(goal.names, t.values)) if t.values is not None else None
        rows.append({"trial": t.number, "state": t.state.name.lower(), "params": t.params,
                     "values": values, "eval_loss": (values or {}).get("eval_loss"),
                     "pareto": t.number in front, "planned_gib": attrs.get("planned_gib"),
                     "measured_peak_gib": attrs.get("measured_peak_gib"),
                     "seconds": attrs.get("seconds"), "pruned_why": attrs.get("pruned_why"),
                     "failed_why": attrs.get("failed_why"), "result": attrs.get("result")})
    return rows


def report_json(study, goal) -> dict:
    """The study as report.json holds it (a dashboard page reads this shape):
    {"objectives": ["eval_loss", "peak_gib"], "directions": ["minimize", "minimize"],
     "labels": {name: column heading}, "best_trial": N or None (best.yaml's),
     "pareto": [trial numbers of the Pareto front, the chosen one first],
     "trials": [{"trial", "state" (complete/pruned/fail/running), "params": {name: value},
                 "values": {objective: value} or None, "eval_loss", "pareto": bool,
                 "planned_gib", "measured_peak_gib", "seconds", "pruned_why", "failed_why",
                 "result": the trial process's row (eval_loss, eval_reward, final_loss,
                 peak_rss_mib, seconds, steps, trainable, all_params, adapter, task_metrics)
                 or None}]}"""
    front = pareto_front(study, goal)
    return {"objectives": list(goal.names), "directions": list(goal.directions),
            "labels": {n: label(n, goal) for n in goal.names},
            "best_trial": front[0].number if front else None,
            "pareto": [t.number for t in front], "trials": trial_rows(study, goal)}


def cell(value) -> str:
    if value is None:
        return "–"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def params_text(params: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in params.items())


def markdown(report: dict) -> str:
    names, labels = report["objectives"], report["labels"]
    # the fixed columns, less those an objective already shows (peak memory, seconds)
    fixed = [(label, key) for label, key, objective in (
        ("planned GiB", "planned_gib", None), ("measured peak GiB", "measured_peak_gib",
                                               "peak_gib"), ("s", "seconds", "seconds"))
             if objective not in names]
    lines = ["| trial | state | params | " + " | ".join(labels[n] for n in names) + " | " +
             " | ".join(label for label, _ in fixed) + " | pruned why |",
             "|---|---|---|" + "---|" * (len(names) + len(fixed) + 1)]
    for r in report["trials"]:
        values = r["values"] or {}
        why = r["pruned_why"] or r["failed_why"]
        cells = [r["trial"], r["state"] + (" (Pareto)" if r["pareto"] and len(names) > 1
                                           else ""), params_text(r["params"]),
                 *(values.get(n) for n in names), *(r[key] for _, key in fixed),
                 why.splitlines()[0] if why else None]
        lines.append("| " + " | ".join(cell(c) for c in cells) + " |")
    return headline(report) + "\n".join(lines) + "\n"


def scores_text(report: dict, trial: int) -> str:
    values = report["trials"][trial]["values"]
    return ", ".join(f"{report['labels'][n]} {values[n]:.4f}" for n in report["objectives"])


def headline(report: dict) -> str:
    best = report["best_trial"]
    if best is None:
        return "no trial completed yet\n\n"
    text = f"best: trial {best}, {scores_text(report, best)} (best.yaml)\n"
    if len(report["objectives"]) > 1:
        text += (f"Pareto front: trials {', '.join(map(str, report['pareto']))}; best.yaml is "
                 f"its best on {report['labels'][report['objectives'][0]]}\n")
    return text + "\n"


def write_text(path: Path, text: str) -> None:
    write_atomic_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=True)


def plot_pareto(report: dict, path: Path) -> None:
    """One objective: its value over trials. Several: the first against each other one, every
    complete trial a dot, the Pareto front ringed and joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, labels = report["objectives"], report["labels"]
    done = [r for r in report["trials"] if r["values"] is not None]
    front = [r for r in done if r["pareto"]]
    pairs = [(names[0], n) for n in names[1:]] or [(None, names[0])]
    fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 4), squeeze=False)
    for ax, (x, y) in zip(axes[0], pairs):
        def xs(rows):
            return [r["trial"] if x is None else r["values"][x] for r in rows]

        ax.scatter(xs(done), [r["values"][y] for r in done], color="#999999", label="trials")
        line = sorted(front, key=lambda r: xs([r])[0])
        ax.plot(xs(line), [r["values"][y] for r in line], "o-", color="#c44e52",
                mfc="none", label="Pareto front" if x else "best")
        ax.set_xlabel("trial" if x is None else labels[x])
        ax.set_ylabel(labels[y])
        ax.legend()
    fig.tight_layout()
    write_atomic_file(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"), overwrite=True)
    plt.close(fig)


def write_reports(study, goal, out: Path) -> dict:
    """report.json, report.md and, once a trial completed, pareto.png and best.yaml."""
    report = report_json(study, goal)
    write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    write_text(out / "report.md", markdown(report))
    best = report["best_trial"]
    if best is not None:
        plot_pareto(report, out / "pareto.png")
        trial = study.get_trials(deepcopy=False)[best]
        config = {**trial.user_attrs["config"], "output_dir": str(out / "best")}
        write_text(out / "best.yaml", f"# trial {best} of {out / 'study.db'}: "
                   f"{scores_text(report, best)}\n" +
                   yaml.safe_dump(config, sort_keys=False))
    return report


def rank_rows(report: dict, cfg) -> list[dict]:
    """tune-rank's complete trials as `compare`'s rows, by rank (tune_rank.json keeps the shape
    it had before tune-rank became a study; the dashboard's report table reads it)."""
    from loratune.adapters import method_record

    rows = []
    for t in report["trials"]:
        res = t["result"]
        if t["state"] != "complete" or not res:
            continue
        rows.append({"variant": f"r{t['params']['r']}", "r": t["params"]["r"],
                     "method": cfg.adapter.method, "lr": cfg.train.lr,
                     "trainable": res["trainable"],
                     "trainable_pct": 100 * res["trainable"] / res["all_params"], "score": None,
                     "eval_loss": res["eval_loss"], "final_loss": res["final_loss"],
                     "seconds_per_step": res["seconds"] / max(res["steps"], 1),
                     "peak_rss_mib": res["peak_rss_mib"],
                     "mergeable": "yes" if method_record(cfg.adapter.method).mergeable else "no",
                     "adapter": res["adapter"], "trial": t["trial"]})
    return sorted(rows, key=lambda r: r["r"])
