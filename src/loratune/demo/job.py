"""The main job: measure the base model on the demo task, fine-tune LoRA, measure again.

Its length fits the machine: a timed 2-step probe sets the number of steps so that the whole
job ends within a wall-clock budget (default 5 minutes), never fewer than the steps that reach
the demo's target, never more than the tuned 80.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from dataclasses import dataclass
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


DEMO_BUDGET_S = 300.0   # the whole job's default wall-clock budget (loratune demo --budget)
# The fewest steps (cosine schedule over them) that reach DEMO_TARGET held-out exact match,
# measured on the 2-core CPU (2026-12-06, seed 42, n=80): 20 steps 53.8%, 40 steps 76.2%,
# 50 steps 83.8%, 60 steps 92.5% (80 steps: 93.8%, benchmarks/README.md).
DEMO_MIN_STEPS = 60
DEMO_TARGET = 0.9
PROBE_STEPS = 2


def demo_config(output_dir: str | None = None, overrides: list[str] = ()) -> RunConfig:
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


@dataclass(frozen=True)
class StepPlan:
    """How many steps the demo trains, and why."""

    steps: int
    step_seconds: float | None  # measured by the probe (None: steps fixed, nothing measured)
    estimate_seconds: float | None  # the whole job, from its start
    why: str
    spent_seconds: float = 0.0  # of the job when the plan was made


def plan_steps(budget_s: float, spent_s: float, step_s: float, eval_s: float,
               max_steps: int, min_steps: int = DEMO_MIN_STEPS) -> StepPlan:
    """The steps that fit what is left of the budget after the held-out eval that follows
    training (as long as the one before: the tuned model answers shorter, so at most that),
    ~3 steps' worth of held-out loss and 10 s of saving; within [min_steps, max_steps]."""
    overhead = eval_s + 3 * step_s + 10.0
    fit = int((budget_s - spent_s - overhead) // step_s)
    steps = max(min_steps, min(max_steps, fit))
    if budget_s == 0:
        why = f"--quick: {steps} steps, the fewest that reach {DEMO_TARGET:.0%} held-out exact match"
    elif steps == fit:
        why = f"{steps} steps fit the {budget_s:.0f} s budget"
    elif steps == max_steps:
        why = f"{steps} steps, the tuned length (more would fit the {budget_s:.0f} s budget)"
    else:
        why = (f"{steps} steps, the fewest that reach {DEMO_TARGET:.0%} held-out exact match "
               f"(only {max(fit, 0)} fit the {budget_s:.0f} s budget on this machine)")
    return StepPlan(steps, step_s, spent_s + steps * step_s + overhead, why, spent_s)


def probe_step_seconds(cfg: RunConfig, model, tok, train_file: str) -> float:
    """Seconds per training step on this machine: PROBE_STEPS demo steps on a copy of the
    model in a throw-away run folder (the first step's warm-up included: an upper bound)."""
    from loratune.train import train

    with tempfile.TemporaryDirectory(prefix="loratune-probe-") as tmp:
        probe = cfg.model_copy(update={"output_dir": str(Path(tmp, "run")), "train": cfg.train
                               .model_copy(update={"max_steps": PROBE_STEPS, "eval_every": None})})
        result = train(probe, model=copy.deepcopy(model), tokenizer=tok, quiet=True,
                       data_paths=(train_file, None))
    return result.seconds / result.steps


def fixed_steps(overrides: list[str]) -> bool:
    """Whether the user set the length (train.max_steps / train.epochs): then no probe."""
    return any(o.split("=", 1)[0] in ("train.max_steps", "train.epochs") for o in overrides)


def choose_steps(cfg: RunConfig, model, tok, train_file: str, spent_s: float, eval_s: float,
                 budget_s: float, overrides: list[str]) -> StepPlan:
    """As train.max_steps/epochs say when set; else timed by the probe and fitted to the budget
    (0: --quick, DEMO_MIN_STEPS)."""
    if fixed_steps(overrides):
        return StepPlan(cfg.train.max_steps, None, None, "as train.max_steps/epochs say")
    t0 = time.perf_counter()
    step_s = probe_step_seconds(cfg, model, tok, train_file)
    spent_s += time.perf_counter() - t0
    return plan_steps(budget_s, spent_s, step_s, eval_s, cfg.train.max_steps)


def say_start(budget_s: float, overrides: list[str]) -> None:
    """The first line: how the job's length will be set, before anything slow."""
    if fixed_steps(overrides):
        how = "length from train.max_steps/epochs (no time probe)"
    elif budget_s == 0:
        how = f"--quick: {DEMO_MIN_STEPS} steps, the fewest that reach {DEMO_TARGET:.0%}"
    else:
        how = (f"steps fitted to a {budget_s:.0f} s budget (--budget S; --quick: "
               f"{DEMO_MIN_STEPS} steps) by a timed {PROBE_STEPS}-step probe")
    print(f"loratune demo: load the model, held-out eval, LoRA training, held-out eval; {how}",
          flush=True)


def say_plan(plan: StepPlan, eval_s: float) -> None:
    """The estimate, printed before training starts."""
    line = f"plan: {plan.why}"
    if plan.step_seconds is not None:
        left = plan.estimate_seconds - plan.spent_seconds
        done = time.strftime("%H:%M:%S", time.localtime(time.time() + left))
        line += (f": {plan.steps} x {plan.step_seconds:.1f} s/step (measured) + held-out eval "
                 f"~{eval_s:.0f} s; whole job ~{plan.estimate_seconds:.0f} s, done ~{done}")
    print(line, flush=True)


def run_demo(output_dir: str | None = None, overrides: list[str] = (),
             budget_s: float = DEMO_BUDGET_S) -> dict:
    """The main job. `budget_s`: the whole job's wall-clock budget (0: --quick, the fewest
    steps that reach the target); train.max_steps/epochs in `overrides` win."""
    from loratune.data import load_conversations, read_records
    from loratune.demo import resolve_data_paths
    from loratune.eval.heldout import exact_match_eval
    from loratune.models import load_model
    from loratune.train import train

    t0 = time.perf_counter()
    cfg = demo_config(output_dir, overrides)
    say_start(budget_s, overrides)
    paths = resolve_data_paths(cfg)
    if any(isinstance(p, list) for p in paths):  # refused before the model loads
        raise ValueError("the demo job plans its steps on one data.train file and scores one "
                         "data.eval file; a list of sources (a mixture) is for `loratune train`")
    model, tok = load_model(cfg.model)
    heldout = paths[1]
    convs = load_conversations(heldout, cfg.data)
    langs = [r.get("lang", "all") for r in read_records(heldout)]
    if cfg.eval.limit:
        convs, langs = convs[: cfg.eval.limit], langs[: cfg.eval.limit]
    print(f"held-out: {len(convs)} items from {heldout}", flush=True)
    ev = dict(max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size)
    t_eval = time.perf_counter()
    before = exact_match_eval(model, tok, convs, **ev)
    eval_s = time.perf_counter() - t_eval
    print(f"before fine-tuning: exact match {before.accuracy:.1%} ({eval_s:.0f} s)", flush=True)
    plan = choose_steps(cfg, model, tok, paths[0], time.perf_counter() - t0, eval_s, budget_s,
                        list(overrides))
    say_plan(plan, eval_s)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": plan.steps})})
    result = train(cfg, model=model, tokenizer=tok, data_paths=paths)
    after = exact_match_eval(model, tok, convs, **ev)
    report = {
        "exact_match_before": before.accuracy, "exact_match_after": after.accuracy,
        "by_language_before": _by_language(before, langs),
        "by_language_after": _by_language(after, langs),
        "train_seconds": result.seconds, "steps": result.steps, "final_loss": result.final_loss,
        "eval_loss": result.eval_loss, "total_seconds": time.perf_counter() - t0,
        "estimated_seconds": plan.estimate_seconds, "plan": plan.why,
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
          f"{report['final_loss']:.4f}; whole job {report['total_seconds']:.0f} s"
          + (f" (estimated {report['estimated_seconds']:.0f} s)"
             if report.get("estimated_seconds") else ""))
    for s in report["samples"]:
        print(f"\nprompt:    {s['prompt']}\nreference: {s['reference']}\n"
              f"before:    {s['before'][:120]}\nafter:     {s['after']}")
    print(f"\nadapter: {report['adapter']}\n"
          f"try it:  loratune chat --adapter {report['adapter']} --prompt "
          "\"Convert the request into a command.\\n\\nStart a 12 minute timer\"")
