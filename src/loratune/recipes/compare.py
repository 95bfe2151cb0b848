"""Side by side: train several adapter variants on the same data and budget, score each on held-out.

Each variant trains in its own process, so its peak memory is its own (a process's peak RSS
never goes down). `loratune compare` varies the method, `loratune tune-rank` the LoRA rank.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from loratune.adapters.registry import AdapterError, method_record
from loratune.config import ConfigError, apply_overrides, build_config

COLUMNS = [("variant", "variant", "{}"), ("method", "method", "{}"), ("lr", "lr", "{:g}"),
           ("trainable", "trainable params", "{:,}"), ("trainable_pct", "trainable %", "{:.3f}"),
           ("score", "held-out exact match", "{:.1%}"), ("eval_loss", "held-out loss", "{:.4f}"),
           ("final_loss", "final train loss", "{:.4f}"), ("seconds_per_step", "s/step", "{:.2f}"),
           ("peak_rss_mib", "peak RSS MiB", "{:.0f}"), ("mergeable", "merge", "{}")]


def ia3_seed(base: dict, options: dict) -> dict:
    """IA³ targets k/v/down by design: another method's target_modules is not taken over."""
    return {k: v for k, v in options.items() if k != "target_modules"}


def adalora_seed(base: dict, options: dict) -> dict:
    """Another method's r becomes AdaLoRA's target rank, starting from half as much again."""
    if "r" in base:
        options.setdefault("target_r", base["r"])
        options.setdefault("init_r", max(base["r"] * 3 // 2, base["r"]))
    return options


# Where taking over the options a method shares with the base section is not the fair start:
# (base section, those options) -> the options to use. Seeding is this recipe's choice, so it
# lives here, not on the method record.
SEEDS = {"ia3": ia3_seed, "adalora": adalora_seed}


def method_adapter(base: dict, method: str) -> dict:
    """The adapter section for `method`, keeping the base section's options that method has."""
    try:
        record = method_record(method)
    except AdapterError as err:
        raise ConfigError(str(err)) from None
    fields = set(record.config_class.model_fields)
    out = {k: v for k, v in base.items() if k in fields and k not in ("method", "use_dora")}
    if method in SEEDS:
        out = SEEDS[method](base, out)
    out["method"] = method
    return out


def load_settings(config_path: str | None, overrides: list[str]) -> dict:
    data = {}
    if config_path:
        data = yaml.safe_load(Path(config_path).read_text(encoding="utf-8")) or {}
    data = apply_overrides(data, list(overrides))
    build_config(data, config_path or "defaults")  # fail here, before any variant runs
    return data


def parse_method_values(text: str, methods: list[str], option: str) -> dict[str, float]:
    """'ia3=1e-2,prompt=3e-2' -> {'ia3': 0.01, 'prompt': 0.03}; every key must be compared."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in methods:
            raise ConfigError(f"{option} item {item!r}: expected METHOD=VALUE with METHOD one of "
                              f"{', '.join(methods)}")
        try:
            out[key] = float(value)
        except ValueError:
            raise ConfigError(f"{option} item {item!r}: {value!r} is not a number") from None
    return out


def task_options(task: str, data: str, options: list[str]) -> dict:
    """`loratune eval` options for `compare --task`: checked (the data read) before training."""
    from loratune.config.commands import EvalCommandConfig
    from loratune.eval.tasks import task_record

    if not data:
        raise ConfigError(f"--task {task} needs --task-data FILE")
    values = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--task-option {item!r}: expected KEY=VALUE (an eval option, "
                              "e.g. shots=5)")
        values[key.strip().replace("-", "_")] = value
    cfg = EvalCommandConfig(task=task, data=data, **values)
    task_record(task).read(cfg)
    return cfg.model_dump(mode="json", exclude={"model", "adapter"}, exclude_unset=True)


def run_variants(settings: dict, variants: dict[str, dict], out_dir: str | Path,
                 quiet: bool = False, lrs: dict[str, float] | None = None,
                 task: dict | None = None) -> list[dict]:
    """Train each variant (label -> adapter section) in a child process; rows of results.
    `task`: `loratune eval` options (task_options) of a task each adapter is also scored on."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, adapter in variants.items():
        data = {**settings, "adapter": adapter, "output_dir": str(out_dir / label)}
        if label in (lrs or {}):
            data["train"] = {**settings.get("train", {}), "lr": lrs[label]}
        build_config(data, f"variant {label}")
        cfg_path = out_dir / f"{label}.yaml"
        cfg_path.write_text(yaml.safe_dump(data, sort_keys=False))
        result_path = out_dir / f"{label}.result.json"
        result_path.unlink(missing_ok=True)
        if not quiet:
            print(f"[{label}] training ({adapter['method']}) ...", flush=True)
        proc = subprocess.run([sys.executable, "-m", "loratune.recipes.compare", str(cfg_path),
                               str(result_path), json.dumps(task or {})],
                              capture_output=quiet, text=True)
        if proc.returncode != 0 or not result_path.is_file():
            detail = (proc.stderr or "")[-2000:] if quiet else "see the output above"
            raise RuntimeError(f"variant {label} failed (exit {proc.returncode}): {detail}")
        row = json.loads(result_path.read_text())
        rows.append({"variant": label, **row})
    return rows


def task_metrics(model, tok, model_cfg, task: dict):
    """The trained adapter's scores on an eval task: (its TaskRecord, {metric: value})."""
    from loratune.config.commands import EvalCommandConfig
    from loratune.eval.tasks import task_record

    cfg = EvalCommandConfig(model=model_cfg, **task)
    record = task_record(cfg.task)
    return record, record.score(model, tok, record.read(cfg), cfg).metrics


def task_score(model, tok, model_cfg, task: dict) -> tuple[str, float]:
    """The trained adapter's headline score on an eval task: ("mc acc", 0.62)."""
    record, metrics = task_metrics(model, tok, model_cfg, task)
    return f"{record.name} {record.headline}", metrics.get(record.headline)


def train_and_score(cfg_path: str, result_path: str, task: dict | None = None) -> dict:
    """Worker: train one config, score it on its held-out set (and `task`), write the row."""
    from loratune.config import load_config
    from loratune.data import load_conversations
    from loratune.data.mixture import as_sources
    from loratune.demo import resolve_data_paths
    from loratune.eval.heldout import exact_match_eval
    from loratune.models import load_model
    from loratune.recipes import quiet_transformers
    from loratune.train import train

    quiet_transformers()
    cfg = load_config(cfg_path)
    model, tok = load_model(cfg.model)
    paths = resolve_data_paths(cfg)  # `train: demo`: the bundled files
    result = train(cfg, model=model, tokenizer=tok, overwrite=True, data_paths=paths)
    summary = json.loads((result.output_dir / "run_summary.json").read_text())
    heldout = paths[1]
    score = None
    if heldout:  # a list of held-out sources: scored together, one after another
        convs = [c for source in as_sources(heldout)
                 for c in load_conversations(source.path, cfg.data)][: cfg.eval.limit]
        score = exact_match_eval(model, tok, convs, cfg.eval.max_new_tokens,
                                 cfg.eval.batch_size).accuracy
    trainable = summary["trainable_params"]
    mergeable = method_record(cfg.adapter.method).mergeable
    row = {"method": cfg.adapter.method, "lr": cfg.train.lr, "trainable": trainable,
           "trainable_pct": 100 * trainable / summary["all_params"], "score": score,
           "eval_loss": result.eval_loss, "final_loss": result.final_loss,
           "seconds_per_step": summary["seconds_per_step"],
           "peak_rss_mib": summary["peak_rss_mib"], "mergeable": "yes" if mergeable else "no",
           "adapter": str(result.adapter_dir)}
    if task:
        row["task"], row["task_score"] = task_score(model, tok, cfg.model, task)
    if "final_ranks" in summary:
        row["total_rank"] = summary["total_rank"]
    Path(result_path).write_text(json.dumps(row, indent=2) + "\n")
    return row


def markdown_table(rows: list[dict]) -> str:
    columns = list(COLUMNS)
    task = next((r["task"] for r in rows if r.get("task")), None)
    if task:  # compare --task: the task's headline beside the held-out exact match
        columns.insert(6, ("task_score", task, "{:.4f}"))
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "---|" * len(columns)]
    for row in rows:
        cells = [fmt.format(row[k]) if row.get(k) is not None else "–" for k, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_rows(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["variant"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for ax, key, title in zip(axes, ["score", "trainable_pct", "seconds_per_step"],
                              ["held-out exact match", "trainable %", "s/step"]):
        ax.bar(labels, [r.get(key) or 0 for r in rows], color="#4c72b0")
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(rows: list[dict], out_dir: Path, stem: str) -> str:
    table = markdown_table(rows)
    (out_dir / f"{stem}.md").write_text(table + "\n")
    (out_dir / f"{stem}.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot_rows(rows, out_dir / f"{stem}.png")
    return table


def best_rank(rows: list[dict]) -> dict:
    """Highest held-out score; ties go to the lower held-out loss, then the fewer parameters."""
    def key(row):
        score = row["score"] if row["score"] is not None else float("-inf")
        loss = row["eval_loss"] if row["eval_loss"] is not None else float("inf")
        return (-score, loss, row["trainable"])
    return min(rows, key=key)


if __name__ == "__main__":
    train_and_score(sys.argv[1], sys.argv[2],
                    json.loads(sys.argv[3]) if len(sys.argv) > 3 else None)
