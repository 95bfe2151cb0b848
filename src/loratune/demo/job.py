"""The main job: measure the base model on the demo task, fine-tune LoRA, measure again."""

from __future__ import annotations

import json
import time
from pathlib import Path

from loratune.config import RunConfig, apply_overrides, build_config

# The demo's settings; examples/demo.yaml holds the same values for users to copy
# (a test keeps the two equal).
DEMO_SETTINGS = {
    "output_dir": "runs/demo",
    "model": {"name": "smollm2-135m-instruct", "device": "cpu", "dtype": "float32"},
    "adapter": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"},
    "data": {"train": "demo", "eval": "demo", "max_length": 256, "packing": "auto"},
    "train": {"max_steps": 80, "batch_size": 2, "grad_accum": 1, "lr": 1e-3,
              "schedule": "cosine", "warmup_ratio": 0.05, "eval_every": 40, "seed": 42},
    "eval": {"max_new_tokens": 32, "batch_size": 16},
}


def demo_config(output_dir: str | None = None, overrides: list[str] = ()) -> RunConfig:
    import copy

    data = copy.deepcopy(DEMO_SETTINGS)
    data["output_dir"] = output_dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}"
    return build_config(apply_overrides(data, list(overrides)), "demo settings")


def _by_language(report, langs: list[str]) -> dict[str, float]:
    out = {}
    for lang in sorted(set(langs)):
        rows = [r for r, l in zip(report.rows, langs) if l == lang]
        out[lang] = sum(r.correct for r in rows) / len(rows)
    return out


def _samples(before, after, langs: list[str]) -> list[dict]:
    """The first held-out item of each language, before and after."""
    out, seen = [], set()
    for b, a, lang in zip(before.rows, after.rows, langs):
        if lang not in seen:
            seen.add(lang)
            out.append({"lang": lang, "prompt": b.prompt, "reference": b.reference,
                        "before": b.prediction, "after": a.prediction})
    return out


def run_demo(output_dir: str | None = None, overrides: list[str] = ()) -> dict:
    from loratune.data import load_conversations, read_records
    from loratune.demo import resolve_data_paths
    from loratune.eval.heldout import exact_match_eval
    from loratune.models import load_model
    from loratune.train import train

    t0 = time.perf_counter()
    cfg = demo_config(output_dir, overrides)
    model, tok = load_model(cfg.model)
    paths = resolve_data_paths(cfg)
    heldout = paths[1]
    convs = load_conversations(heldout, cfg.data)
    langs = [r.get("lang", "all") for r in read_records(heldout)]
    if cfg.eval.limit:
        convs, langs = convs[: cfg.eval.limit], langs[: cfg.eval.limit]
    print(f"held-out: {len(convs)} items from {heldout}")
    ev = dict(max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size)
    before = exact_match_eval(model, tok, convs, **ev)
    print(f"before fine-tuning: exact match {before.accuracy:.1%}")
    result = train(cfg, model=model, tokenizer=tok, data_paths=paths)
    after = exact_match_eval(model, tok, convs, **ev)
    report = {
        "exact_match_before": before.accuracy, "exact_match_after": after.accuracy,
        "by_language_before": _by_language(before, langs),
        "by_language_after": _by_language(after, langs),
        "train_seconds": result.seconds, "steps": result.steps, "final_loss": result.final_loss,
        "eval_loss": result.eval_loss, "total_seconds": time.perf_counter() - t0,
        "adapter": str(result.adapter_dir),
        "samples": _samples(before, after, langs),
    }
    Path(cfg.output_dir, "demo_report.json").write_text(
        json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print_report(report, len(convs))
    return report


def print_report(report: dict, n: int) -> None:
    print()
    print(f"{'held-out exact match':<24}{'before':>10}{'after':>10}   (n={n})")
    print(f"{'all':<24}{report['exact_match_before']:>10.1%}{report['exact_match_after']:>10.1%}")
    for lang in report["by_language_after"]:
        print(f"{lang:<24}{report['by_language_before'][lang]:>10.1%}"
              f"{report['by_language_after'][lang]:>10.1%}")
    print(f"\ntraining: {report['steps']} steps in {report['train_seconds']:.0f} s, final loss "
          f"{report['final_loss']:.4f}; whole job {report['total_seconds']:.0f} s")
    for s in report["samples"]:
        print(f"\nprompt:    {s['prompt']}\nreference: {s['reference']}\n"
              f"before:    {s['before'][:120]}\nafter:     {s['after']}")
    print(f"\nadapter: {report['adapter']}\n"
          f"try it:  loratune chat --adapter {report['adapter']} --prompt "
          "\"Convert the request into a command.\\n\\nStart a 12 minute timer\"")
