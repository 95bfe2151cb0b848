"""`mc`: multiple choice scored by the log-likelihood of each option (MMLU, C-Eval, CMMLU).

Each question is shown as in MMLU's paper: a header naming the subject, `--shots` solved
examples of that subject from `--dev`, then the question, its lettered options and "Answer:"
(Chinese questions get the CMMLU header and "答案："). The model's choice is the option whose
continuation is likeliest: the option's text (`--mc-score text`, default) or its letter.
`acc` takes the highest sum of log-probabilities; `acc_norm` divides it by the continuation's
length in UTF-8 bytes first (as lm-evaluation-harness does), so long options are not penalised
for their length. The header and shots are the same for every question of a subject: their
KV cache is computed once per subject (`loglik.score_items`).
"""

from __future__ import annotations

import re
from collections import defaultdict

from loratune.eval.loglik import score_items
from loratune.eval.mc_files import LETTERS, Question, read_questions
from loratune.eval.tasks.registry import (TaskData, TaskError, TaskRecord, TaskResult, Timer,
                                          hashed, register)

CJK = re.compile(r"[\u4e00-\u9fff]")


def _chinese(q: Question) -> bool:
    return bool(CJK.search(q.question))


def header(subject: str, chinese: bool) -> str:
    words = subject.replace("_", " ")
    if chinese:
        return f"以下是关于{words}的单项选择题，请直接给出正确答案的选项。\n\n"
    return f"The following are multiple choice questions (with answers) about {words}.\n\n"


def question_text(q: Question) -> str:
    options = "".join(f"\n{LETTERS[i]}. {o}" for i, o in enumerate(q.options))
    return f"{q.question}{options}\n{'答案：' if _chinese(q) else 'Answer:'}"


def continuation(q: Question, index: int, score: str) -> str:
    text = LETTERS[index] if score == "letter" else q.options[index]
    return text if _chinese(q) else f" {text}"


def prefix_text(subject: str, shots: list[Question], chinese: bool, score: str) -> str:
    """The header and the solved examples that come before every question of `subject`."""
    return header(subject, chinese) + "".join(
        question_text(s) + continuation(s, s.answer, score) + "\n\n" for s in shots)


def read(cfg) -> TaskData:
    questions = read_questions(cfg.data)[: cfg.limit]
    shots: dict[str, list[Question]] = defaultdict(list)
    if cfg.shots:
        if not cfg.dev:
            raise TaskError(f"--shots {cfg.shots} needs --dev FILE: the solved examples (MMLU's "
                            "dev split) shown before each question")
        for q in read_questions(cfg.dev):
            shots[q.subject].append(q)
        for subject in dict.fromkeys(q.subject for q in questions):
            if len(shots[subject]) < cfg.shots:
                raise TaskError(f"--dev {cfg.dev}: {len(shots[subject])} solved examples of "
                                f"subject {subject!r}; --shots needs {cfg.shots}")
    items = [(q, shots[q.subject][: cfg.shots]) for q in questions]
    return TaskData(items, hashed(cfg.data, cfg.dev if cfg.shots else None),
                    {"subjects": len({q.subject for q in questions}), "shots": cfg.shots})


def _ids(tokenizer, text: str, special: bool = False) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def score(model, tokenizer, data: TaskData, cfg) -> TaskResult:
    by_subject: dict[str, list[tuple[Question, list[Question]]]] = defaultdict(list)
    for q, shots in data.items:
        by_subject[q.subject].append((q, shots))
    rows, groups = [], {}
    with Timer() as timer:
        for subject, items in by_subject.items():
            prefix = _ids(tokenizer, prefix_text(subject, items[0][1], _chinese(items[0][0]),
                                                 cfg.mc_score), special=True)
            conts = [[continuation(q, i, cfg.mc_score) for i in range(len(q.options))]
                     for q, _ in items]
            batch = [(prefix + _ids(tokenizer, question_text(q)), [_ids(tokenizer, c) for c in cs])
                     for (q, _), cs in zip(items, conts)]
            scored = score_items(model, batch, cfg.batch_size, prefix=prefix)
            hits = []
            for (q, _), cs, scores in zip(items, conts, scored):
                lls = [s.logprob for s in scores]
                norm = [ll / len(c.encode()) for ll, c in zip(lls, cs)]
                pick, pick_norm = _argmax(lls), _argmax(norm)
                hits.append((pick == q.answer, pick_norm == q.answer))
                rows.append({"where": q.where, "subject": subject, "answer": LETTERS[q.answer],
                             "pred": LETTERS[pick], "pred_norm": LETTERS[pick_norm],
                             "logprobs": [round(x, 4) for x in lls]})
            groups[subject] = {"acc": sum(h for h, _ in hits) / len(hits),
                               "acc_norm": sum(h for _, h in hits) / len(hits), "n": len(hits)}
    n = len(rows)
    metrics = {"acc": sum(r["pred"] == r["answer"] for r in rows) / n,
               "acc_norm": sum(r["pred_norm"] == r["answer"] for r in rows) / n,
               "acc_macro": sum(g["acc"] for g in groups.values()) / len(groups)}
    return TaskResult(metrics, n, timer.seconds, groups, rows)


register(TaskRecord(
    name="mc", summary="multiple choice by option log-likelihood (MMLU, C-Eval, CMMLU layouts)",
    read=read, score=score, headline="acc",
    options=("limit", "shots", "dev", "mc_score", "batch_size"),
    formats={"acc": "{:.1%}", "acc_norm": "{:.1%}", "acc_macro": "{:.1%}"}))
