"""From a data file to tokenized examples, with counts of what was cut or dropped."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from loratune.config import DataConfig
from loratune.data.encode import IGNORE, Example, encode_conversation
from loratune.data.formats import DataError, detect_format, read_located, to_messages
from loratune.data.templates import resolve_template


@dataclass
class DataStats:
    format: str
    n_records: int = 0
    n_examples: int = 0
    n_truncated: int = 0
    n_dropped: int = 0
    n_tokens: int = 0
    n_label_tokens: int = 0


def load_conversations(path: str | Path, cfg: DataConfig) -> list[list[dict]]:
    located = read_located(path)
    fmt = cfg.format if cfg.format != "auto" else detect_format(located[0][1], located[0][0])
    return [to_messages(rec, fmt, where, cfg.system_prompt) for where, rec in located]


def build_examples(path: str | Path, tokenizer, cfg: DataConfig) -> tuple[list[Example], DataStats]:
    located = read_located(path)
    fmt = cfg.format if cfg.format != "auto" else detect_format(located[0][1], located[0][0])
    template = resolve_template(tokenizer, cfg.template)
    stats = DataStats(format=fmt, n_records=len(located))
    examples = []
    for where, record in located:
        messages = to_messages(record, fmt, where, cfg.system_prompt)
        example, truncated = encode_conversation(messages, tokenizer, template, cfg.train_on,
                                                 cfg.max_length, cfg.overflow)
        stats.n_truncated += int(truncated and example is not None)
        if example is None:
            stats.n_dropped += 1
            continue
        examples.append(example)
        stats.n_tokens += len(example)
        stats.n_label_tokens += sum(label != IGNORE for label in example.labels)
    stats.n_examples = len(examples)
    if not examples:
        raise DataError(f"{path}: no usable examples ({stats.n_dropped} dropped: longer than "
                        f"max_length={cfg.max_length} or nothing to learn)")
    return examples, stats


def split_heldout(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic split: (train, held-out) with round(fraction * n) held out (at least 1)."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    k = max(1, round(fraction * len(items)))
    held = set(order[:k])
    return ([x for i, x in enumerate(items) if i not in held],
            [x for i, x in enumerate(items) if i in held])
