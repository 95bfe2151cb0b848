"""`preference`: does the model rank the chosen answer above the rejected one?

The data is a preference file as training reads it (prompt/chosen/rejected, strings or message
lists, or chosen/rejected conversations with a shared prompt; see data/preference_pairs.py).
Each side is scored by the log-probability of its answer tokens (end-of-turn marker included)
after the chat-templated prompt. `accuracy`: the share of pairs where the chosen answer is the likelier
one (summed log-probs); `accuracy_norm`: the same on log-probs per token; `margin`: the mean
of log p(chosen) - log p(rejected), in nats. The same numbers for the base and each adapter.
"""

from __future__ import annotations

import torch

from loratune import progress
from loratune.data.bundled import BUNDLED, bundled_path
from loratune.data.formats import locate, read_indexed
from loratune.data.preference_pairs import (PairExample, collate_pairs, encode_pair,
                                            pair_messages, record_kind)
from loratune.data.errors import DataError
from loratune.data.templates import resolve_template
from loratune.eval.tasks.registry import TaskData, TaskRecord, TaskResult, Timer, hashed, register
from loratune.models.logprobs import next_token_logps


def read(cfg) -> TaskData:
    """(where, chosen conversation, rejected conversation) per pair; `--data demo-pairs`: the
    bundled held-out pairs of the demo task."""
    path = str(bundled_path(cfg.data, held_out=True)) if cfg.data in BUNDLED else cfg.data
    items = []
    for index, record in read_indexed(path):
        where = locate(path, index)
        if record_kind(record, where) != "pairs":
            raise DataError(f"{where}: --task preference needs prompt/chosen/rejected pairs")
        items.append((where, *pair_messages(record, where)))
    return TaskData(items[: cfg.limit] if cfg.limit else items, hashed(path))


def tokenized(items: list, tokenizer) -> list[PairExample]:
    template = resolve_template(tokenizer, None)
    return [PairExample(*encode_pair(chosen, rejected, tokenizer, template, where))
            for where, chosen, rejected in items]


@torch.no_grad()
def pair_logps(model, pairs: list[PairExample], pad_id: int,
               batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 2) summed answer log-probs (chosen, rejected) and (B, 2) answer token counts."""
    device = next(model.parameters()).device
    sums, counts = [], []
    shown = progress.bar("preference", len(pairs), "pairs")
    for i in range(0, len(pairs), batch_size):
        batch = collate_pairs(pairs[i:i + batch_size], pad_id)
        score = (batch["labels"][:, 1:] != -100).to(device)
        logps = next_token_logps(model, batch["input_ids"].to(device),
                                 batch["attention_mask"].to(device), score)
        n = len(batch["input_ids"]) // 2
        sums.append(logps.sum(-1).view(2, n).T.double().cpu())
        counts.append(score.sum(-1).view(2, n).T.double().cpu())
        shown.update(n)
    shown.close()
    return torch.cat(sums), torch.cat(counts)


def score(model, tokenizer, data: TaskData, cfg) -> TaskResult:
    pairs = tokenized(data.items, tokenizer)
    was_training = model.training
    model.eval()
    with Timer() as timer:
        sums, counts = pair_logps(model, pairs, tokenizer.pad_token_id, cfg.batch_size)
    model.train(was_training)
    diff = sums[:, 0] - sums[:, 1]
    mean = sums / counts
    metrics = {"accuracy": float((diff > 0).double().mean()),
               "accuracy_norm": float((mean[:, 0] > mean[:, 1]).double().mean()),
               "margin": float(diff.mean())}
    rows = [{"pair": where, "logp_chosen": round(float(s[0]), 4),
             "logp_rejected": round(float(s[1]), 4), "correct": bool(d > 0)}
            for (where, _, _), s, d in zip(data.items, sums, diff)]
    return TaskResult(metrics, len(rows), timer.seconds, rows=rows)


register(TaskRecord(
    name="preference", summary="held-out preference pairs: how often the chosen answer is the "
    "likelier one, and the mean log-prob margin",
    read=read, score=score, headline="accuracy", options=("limit", "batch_size"),
    formats={"accuracy": "{:.1%}", "accuracy_norm": "{:.1%}", "margin": "{:.3f}"}))
