"""`exact` (the default task): answer each held-out conversation, exact match with the reference.

The conversations are rendered with the tokenizer's chat template; the reference is the last
assistant turn (alpaca / messages / sharegpt files, as training reads them).
"""

from __future__ import annotations

from loratune.config import DataConfig
from loratune.data import load_conversations
from loratune.eval.heldout import exact_match_eval
from loratune.eval.tasks.registry import TaskData, TaskRecord, TaskResult, Timer, hashed, register

MAX_NEW_TOKENS = 32


def read(cfg) -> TaskData:
    convs = load_conversations(cfg.data, DataConfig(train=cfg.data))
    return TaskData(convs[: cfg.limit] if cfg.limit else convs, hashed(cfg.data))


def score(model, tokenizer, data: TaskData, cfg) -> TaskResult:
    with Timer() as timer:
        report = exact_match_eval(model, tokenizer, data.items,
                                  cfg.max_new_tokens or MAX_NEW_TOKENS, cfg.batch_size)
    rows = [{"prompt": r.prompt, "reference": r.reference, "prediction": r.prediction,
             "correct": r.correct} for r in report.rows]
    return TaskResult({"exact_match": report.accuracy}, report.n, timer.seconds, rows=rows)


register(TaskRecord(
    name="exact", summary="exact match of generated answers on a held-out chat file (default)",
    read=read, score=score, headline="exact_match",
    options=("limit", "max_new_tokens", "batch_size"), formats={"exact_match": "{:.1%}"}))
