"""`generate`: answer held-out conversations, scored by exact match, token F1, ROUGE-L and BLEU
(`eval.text_metrics`). The data is an alpaca / messages / sharegpt file; each conversation's
last assistant turn is the reference, the turns before it the prompt (chat template applied).
Greedy unless `--temperature` > 0 (then sampled with `--seed`).
"""

from __future__ import annotations

from loratune.config import DataConfig
from loratune.data import load_conversations
from loratune.eval.generate import generate_chat
from loratune.eval.heldout import split_prompt_reference
from loratune.eval.tasks.registry import TaskData, TaskRecord, TaskResult, Timer, hashed, register
from loratune.eval.text_metrics import generation_scores

MAX_NEW_TOKENS = 128


def read(cfg) -> TaskData:
    convs = load_conversations(cfg.data, DataConfig(train=cfg.data))[: cfg.limit]
    return TaskData([split_prompt_reference(c) for c in convs], hashed(cfg.data))


def score(model, tokenizer, data: TaskData, cfg) -> TaskResult:
    prompts = [p for p, _ in data.items]
    references = [r for _, r in data.items]
    sampling = {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p,
                "seed": cfg.seed} if cfg.temperature > 0 else {}
    with Timer() as timer:
        predictions = generate_chat(model, tokenizer, prompts, cfg.max_new_tokens or
                                    MAX_NEW_TOKENS, cfg.batch_size, **sampling)
    metrics, rows = generation_scores(predictions, references)
    for row, prompt in zip(rows, prompts):
        row["prompt"] = prompt[-1]["content"]
    return TaskResult(metrics, len(rows), timer.seconds, rows=rows)


register(TaskRecord(
    name="generate", summary="generated answers: exact match, token F1, ROUGE-L, BLEU",
    read=read, score=score, headline="rouge_l",
    options=("limit", "max_new_tokens", "batch_size", "temperature", "top_p", "seed"),
    formats={"exact_match": "{:.1%}", "bleu": "{:.2f}"}))
