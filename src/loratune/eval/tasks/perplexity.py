"""`perplexity`: token-level perplexity of text, with sliding windows over the context.

The data is a .txt file (one text) or JSON/JSONL records with a `text` field (one text each).
Each text is tokenized whole, after a start token (the tokenizer's BOS, else EOS, as
lm-evaluation-harness does), so every token of the text is scored. A window holds `--max-length`
tokens and moves on by `--stride`; it scores only the tokens no earlier window scored, so each
token is scored once, with at least max_length - stride tokens before it (all of them in the
first window). `--stride` must be smaller than the window. `perplexity` is exp of the mean negative log-likelihood per token;
`bits_per_byte` divides the total by ln 2 and the texts' UTF-8 bytes (comparable across
tokenizers).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from loratune import progress
from loratune.data.errors import DataError
from loratune.data.formats import read_indexed, read_text_file
from loratune.eval.tasks.registry import TaskData, TaskRecord, TaskResult, Timer, hashed, register

DEFAULT_WINDOW_CAP = 2048  # the context length, at most this: logits of a window stay small


def read(cfg) -> TaskData:
    path = Path(cfg.data)
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise DataError(f"data file not found: {path}")
        texts = [(str(path), read_text_file(path))]
    else:
        texts = []
        for n, record in read_indexed(path):
            text = record.get("text")
            if not isinstance(text, str):
                raise DataError(f"{path}:{n}: expected a string field 'text' (perplexity reads "
                                ".txt files or records with text)")
            texts.append((f"{path}:{n}", text))
    texts = [(w, t) for w, t in texts if t.strip()][: cfg.limit]
    if not texts:
        raise DataError(f"{path}: no text")
    return TaskData(texts, hashed(path))


def windows(n: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored) of each window over tokens 0..n-1; token 0 (the start token)
    is context only, every other token is scored by exactly one window. The first window
    scores its max_length - 1 tokens, each later one the next `stride` tokens, with the
    max_length - stride tokens before them as context."""
    if stride >= max_length:
        raise ValueError(f"stride (--stride) {stride} must be smaller than the window "
                         f"(--max-length) {max_length}: a window's first scored token needs "
                         "context before it")
    out = [(0, min(max_length, n), 1)] if n > 1 else []
    while out and out[-1][1] < n:
        first = out[-1][1]
        end = min(first + stride, n)
        out.append((max(0, end - max_length), end, first))
    return out


def window_size(model, cfg) -> tuple[int, int]:
    context = getattr(model.config, "max_position_embeddings", None) or DEFAULT_WINDOW_CAP
    size = cfg.max_length or min(context, DEFAULT_WINDOW_CAP)
    return size, cfg.stride or max(size // 2, 1)


@torch.no_grad()
def score_windows(model, rows: list[tuple[list[int], int]], batch_size: int) -> list[torch.Tensor]:
    """Log-probabilities of tokens first..end of each (window ids, first scored) row."""
    device = next(model.parameters()).device
    out = []
    shown = progress.bar("perplexity", len(rows), "windows")
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        x = torch.tensor([ids + [ids[-1]] * (width - len(ids)) for ids, _ in chunk], device=device)
        logp = torch.log_softmax(model(input_ids=x, attention_mask=torch.ones_like(x)).logits
                                 .float(), -1)
        for row, (ids, first) in zip(logp, chunk):
            targets = torch.tensor(ids[first:], device=device)
            out.append(row[first - 1:len(ids) - 1].gather(-1, targets[:, None])[:, 0].cpu())
        shown.update(len(chunk))
    shown.close()
    return out


def score(model, tokenizer, data: TaskData, cfg) -> TaskResult:
    size, stride = window_size(model, cfg)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None \
        else tokenizer.eos_token_id
    rows, nll, tokens, n_bytes = [], 0.0, 0, 0
    with Timer() as timer:
        docs = []
        for where, text in data.items:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            docs.append((where, text, [start, *ids]))
        spans = [(d, w) for d, (_, _, ids) in enumerate(docs) for w in windows(len(ids), size,
                                                                               stride)]
        scored = score_windows(model, [(docs[d][2][b:e], f - b) for d, (b, e, f) in spans],
                                cfg.batch_size)
        per_doc: dict[int, float] = {}
        for (d, _), logp in zip(spans, scored):
            per_doc[d] = per_doc.get(d, 0.0) - float(logp.sum())
        for d, (where, text, ids) in enumerate(docs):
            n = len(ids) - 1
            nll, tokens, n_bytes = nll + per_doc[d], tokens + n, n_bytes + len(text.encode())
            rows.append({"where": where, "tokens": n, "perplexity": math.exp(per_doc[d] / n)})
    metrics = {"perplexity": math.exp(nll / tokens), "nll_per_token": nll / tokens,
               "bits_per_byte": nll / math.log(2) / n_bytes, "tokens": tokens}
    notes = [f"windows of {size} tokens, stride {stride}"]
    return TaskResult(metrics, len(rows), timer.seconds, rows=rows, notes=notes)


register(TaskRecord(
    name="perplexity", summary="token-level perplexity of a text or JSONL file (sliding windows)",
    read=read, score=score, headline="perplexity",
    options=("limit", "max_length", "stride", "batch_size"), formats={"tokens": "{:.0f}"},
    lower_better=("perplexity", "nll_per_token", "bits_per_byte")))
