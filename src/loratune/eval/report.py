"""The report of `loratune eval`: JSON (everything, per item too) and Markdown (the tables),
with each data file's SHA-256 and the settings, side by side for the base and each adapter."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from loratune.eval.run import EvalRun
from loratune.files import write_atomic_file


def report_dict(run: EvalRun) -> dict:
    return {
        "task": run.record.name, "headline": run.record.headline,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data": {"files": run.data.files, "items": len(run.data.items), **run.data.extra},
        "settings": run.settings,
        "variants": [{"label": v.label, "adapter": v.adapters, "metrics": v.result.metrics,
                      "n": v.result.n, "seconds": round(v.result.seconds, 3),
                      "items_per_second": round(v.result.items_per_second, 3),
                      "groups": v.result.groups, "notes": v.result.notes, "rows": v.result.rows}
                     for v in run.variants],
    }


def _cell(value, fmt: str) -> str:
    return "–" if value is None else fmt.format(value)


def markdown(run: EvalRun) -> str:
    """A metrics x variants table, items/s, then the headline per group (subject, problem)."""
    record, variants = run.record, run.variants
    head = "| metric | " + " | ".join(v.label for v in variants) + " |"
    rule = "|---|" + "---|" * len(variants)
    metrics = list(dict.fromkeys(m for v in variants for m in v.result.metrics))
    lines = [f"# eval --task {record.name}", ""]
    lines += [f"- data: `{path}` sha256 `{digest}`" for path, digest in run.data.files.items()]
    shown = {k: v for k, v in run.settings.items() if k not in ("task", "model")}
    lines += [f"- model: `{run.settings['model']['name']}`",
              f"- settings: {json.dumps(shown, ensure_ascii=False)}", "", head, rule]
    for m in metrics:
        fmt = record.formats.get(m, "{:.4f}")
        lines.append(f"| {m} | " + " | ".join(_cell(v.result.metrics.get(m), fmt)
                                             for v in variants) + " |")
    lines.append("| items | " + " | ".join(str(v.result.n) for v in variants) + " |")
    lines.append("| items/s | " + " | ".join(f"{v.result.items_per_second:.2f}"
                                            for v in variants) + " |")
    groups = list(dict.fromkeys(g for v in variants for g in v.result.groups))
    if groups:
        key = record.headline
        fmt = record.formats.get(key, "{:.4f}")
        lines += ["", f"| {key} by group | " + " | ".join(v.label for v in variants) + " |", rule]
        for g in groups:
            lines.append(f"| {g} | " + " | ".join(
                _cell(v.result.groups.get(g, {}).get(key), fmt) for v in variants) + " |")
    notes = list(dict.fromkeys(n for v in variants for n in v.result.notes))
    if notes:
        lines += [""] + [f"- note: {n}" for n in notes]
    return "\n".join(lines) + "\n"


def default_out(adapters: list[str]) -> Path | None:
    """The run folder of a single adapter that `loratune train` wrote (it has run_summary.json)."""
    if len(adapters) == 1 and (Path(adapters[0]).parent / "run_summary.json").is_file():
        return Path(adapters[0]).parent
    return None


def write_report(run: EvalRun, out: str | Path) -> tuple[Path, Path]:
    """out/eval-<task>.json and .md, each written atomically (a previous report is replaced)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"eval-{run.record.name}"
    text = json.dumps(report_dict(run), indent=2, ensure_ascii=False) + "\n"
    paths = []
    for path, body in ((stem.with_suffix(".json"), text), (stem.with_suffix(".md"), markdown(run))):
        write_atomic_file(path, lambda tmp, body=body: tmp.write_text(body, encoding="utf-8"),
                          overwrite=True)
        paths.append(path)
    return paths[0], paths[1]
