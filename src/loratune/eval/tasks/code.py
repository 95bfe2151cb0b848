"""`code`: HumanEval-format problems, pass@1 and pass@k with the unbiased estimator.

The data is JSONL with task_id, prompt (signature and docstring), test (defines
`check(candidate)`) and entry_point. Each problem gets `--samples` completions of its prompt as
plain text (no chat template, as HumanEval is run), greedy for one sample, sampled at
`--temperature` for more; a completion is cut at the first line that starts a new top-level
statement (HumanEval's stop sequences). prompt + completion + test + `check(entry_point)` runs
under bubblewrap (`eval.sandbox`: namespaces, seccomp, a capped tmpfs, CPU-time, memory and
wall limits; `--sandbox none` runs it without that boundary, with a warning, and without
bwrap the task refuses to start); a program that exits before its tests finished fails; its
outcome (passed, failed, timeout, refused, memory, error) is reported
per completion and counted per problem. pass@k for a problem with n samples of which c pass is
1 - C(n-c, k) / C(n, k) (Chen et al. 2021), averaged over problems.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from loratune.data.errors import DataError
from loratune.data.formats import read_indexed
from loratune.eval.generate import generate_text
from loratune.eval.sandbox import Limits, require_sandbox, run_programs
from loratune.eval.tasks.registry import TaskData, TaskRecord, TaskResult, Timer, hashed, register

MAX_NEW_TOKENS = 384
STOP = ("\ndef ", "\nclass ", "\nif ", "\nprint(", "\n#", "\nassert ")
FIELDS = ("task_id", "prompt", "test", "entry_point")


def read(cfg) -> TaskData:
    require_sandbox(cfg.sandbox)  # before the model loads: no bwrap, no generated code run
    problems = []
    for n, record in read_indexed(cfg.data):
        missing = [f for f in FIELDS if not isinstance(record.get(f), str) or not record[f]]
        if missing:
            raise DataError(f"{cfg.data}:{n}: missing or empty {', '.join(missing)} (HumanEval "
                            f"format: {', '.join(FIELDS)})")
        problems.append({f: record[f] for f in FIELDS})
    return TaskData(problems[: cfg.limit], hashed(cfg.data))


def truncate(completion: str) -> str:
    """The completion up to the first stop sequence (the function body, nothing after it)."""
    cut = min((i for i in (completion.find(s) for s in STOP) if i >= 0), default=len(completion))
    return completion[:cut]


def program(problem: dict, completion: str) -> str:
    return (f"{problem['prompt']}{completion}\n\n{problem['test']}\n\n"
            f"check({problem['entry_point']})\n")


def pass_at_k(n: int, c: int, k: int) -> float:
    """The chance that k of the n samples, drawn without replacement, include a passing one."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def score_completions(problems: list[dict], completions: list[list[str]], ks: list[int],
                      limits: Limits, workers: int = 2, sandbox: str = "bwrap") -> TaskResult:
    """Run every completion of every problem; pass@k overall and per problem."""
    flat = [(p, c) for p, cs in zip(problems, completions) for c in cs]
    with Timer() as timer:
        outcomes = run_programs([program(p, c) for p, c in flat], limits, workers, sandbox)
    rows, groups, at = [], {}, 0
    for problem, cs in zip(problems, completions):
        mine = outcomes[at:at + len(cs)]
        at += len(cs)
        passed = sum(o.passed for o in mine)
        groups[problem["task_id"]] = {**{f"pass@{k}": pass_at_k(len(cs), passed, k) for k in ks},
                                      "passed": passed, "n": len(cs),
                                      **Counter(o.status for o in mine)}
        rows += [{"task_id": problem["task_id"], "sample": i, "status": o.status,
                  "detail": o.detail, "seconds": round(o.seconds, 3), "completion": c}
                 for i, (c, o) in enumerate(zip(cs, mine))]
    metrics = {f"pass@{k}": sum(g[f"pass@{k}"] for g in groups.values()) / len(groups)
               for k in ks}
    counts = Counter(r["status"] for r in rows)
    notes = ["outcomes: " + ", ".join(f"{s} {n}" for s, n in sorted(counts.items()))]
    return TaskResult(metrics, len(problems), timer.seconds, groups, rows, notes)


def score(model, tokenizer, data: TaskData, cfg) -> TaskResult:
    prompts = [p["prompt"] for p in data.items for _ in range(cfg.samples)]
    sampling = {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p,
                "seed": cfg.seed} if cfg.temperature > 0 else {}
    with Timer() as timer:
        texts = generate_text(model, tokenizer, prompts, cfg.max_new_tokens or MAX_NEW_TOKENS,
                              cfg.batch_size, **sampling)
    completions = [[truncate(t) for t in texts[i:i + cfg.samples]]
                   for i in range(0, len(texts), cfg.samples)]
    limits = Limits(cfg.timeout, cfg.cpu_seconds, cfg.memory_mb)
    result = score_completions(data.items, completions, cfg.k, limits, cfg.workers,
                               cfg.sandbox)
    result.seconds += timer.seconds  # items/s counts generation and running
    return result


register(TaskRecord(
    name="code", summary="HumanEval-format problems: pass@k, completions run in a sandbox",
    read=read, score=score, headline="pass@1",
    options=("limit", "samples", "k", "temperature", "top_p", "seed", "max_new_tokens",
             "batch_size", "timeout", "cpu_seconds", "memory_mb", "workers", "sandbox"),
    formats={"pass@1": "{:.1%}"}))
