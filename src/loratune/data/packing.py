"""Batches: padded rows, or several examples packed per row with no attention across them.

Packed rows carry `position_ids` that restart at 0 for each example and no `attention_mask`;
transformers then builds a block-diagonal causal mask from the position resets.
"""

from __future__ import annotations

import random

import torch

from loratune.data.encode import IGNORE, Example


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of one epoch: a pure function of (seed, epoch)."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def pack_examples(examples: list[Example], max_length: int) -> list[list[Example]]:
    """First-fit in the given order: each row holds whole examples up to max_length tokens."""
    rows: list[list[Example]] = []
    room: list[int] = []
    for ex in examples:
        size = min(len(ex), max_length)
        for i, free in enumerate(room):
            if size <= free:
                rows[i].append(ex)
                room[i] -= size
                break
        else:
            rows.append([ex])
            room.append(max_length - size)
    return rows


def collate(rows: list[list[Example]], pad_id: int, packed: bool) -> dict[str, torch.Tensor]:
    width = max(sum(len(ex) for ex in row) for row in rows)
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for ex in row:
            end = at + len(ex)
            input_ids[r, at:end] = torch.tensor(ex.input_ids)
            labels[r, at:end] = torch.tensor(ex.labels)
            # With shifted next-token loss, the previous example's last token must not be
            # trained to predict this example's first token.
            labels[r, at] = IGNORE
            position_ids[r, at:end] = torch.arange(len(ex))
            attention[r, at:end] = 1
            at = end
        # Trailing padding forms its own segment (positions restart) and carries no loss.
        position_ids[r, at:] = torch.arange(width - at)
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    if not packed:
        batch["attention_mask"] = attention
    return batch


def padded_fraction(examples: list[Example], batch_size: int) -> float:
    total = padded = 0
    for i in range(0, len(examples), batch_size):
        lens = [len(ex) for ex in examples[i:i + batch_size]]
        total += max(lens) * len(lens)
        padded += max(lens) * len(lens) - sum(lens)
    return padded / max(total, 1)


def should_pack(examples: list[Example], max_length: int, batch_size: int) -> bool:
    """Pack when padding would waste over 20% of the batch, or rows fit several examples."""
    if not examples:
        return False
    mean = sum(len(ex) for ex in examples) / len(examples)
    return padded_fraction(examples, batch_size) > 0.2 or mean * 2 <= max_length


def batches(examples: list[Example], batch_size: int, max_length: int, packing: bool,
            pad_id: int, seed: int, epoch: int) -> list[dict[str, torch.Tensor]]:
    """All micro-batches of one epoch, deterministic in (seed, epoch)."""
    ordered = [examples[i] for i in epoch_order(len(examples), seed, epoch)]
    rows = pack_examples(ordered, max_length) if packing else [[ex] for ex in ordered]
    return [collate(rows[i:i + batch_size], pad_id, packing)
            for i in range(0, len(rows), batch_size)]
