"""Batches: one padded example per row, or several examples packed per row.

Packed rows carry `position_ids` that restart at 0 for each example and no `attention_mask`.
transformers (masking_utils.find_packed_sequence_indices) then starts a new segment wherever
a position does not follow its predecessor by 1, and builds a block-diagonal causal mask, so
no token attends across examples. It does so only without a KV cache: call the model with
`use_cache=False`, as training does.

The order of one epoch's batches is a pure function of (examples, seed, epoch), so a resumed
run at step k sees exactly the batches the interrupted run would have.
"""

from __future__ import annotations

import random
from array import array

import torch

from loratune.data.encode import IGNORE, Example, ImageExample
from loratune.data.errors import DataError

PAD_SHARE_TO_PACK = 0.2  # packing: auto packs when padding would exceed this share of tokens


def _first_fit(sizes: list[int], order: list[int], capacity: int) -> list[list[int]]:
    """First fit of items `order` into bins of `capacity`: indices per bin.

    A max-tree over the free room of bins finds the first bin that fits in O(log n);
    bins not yet opened have full room, so the first fit is an open bin or the next new one.
    """
    leaves = 1
    while leaves < max(len(order), 1):
        leaves *= 2
    room = [capacity] * (2 * leaves)
    bins: list[list[int]] = []
    for i in order:
        node = 1
        while node < leaves:
            node = 2 * node if room[2 * node] >= sizes[i] else 2 * node + 1
        b = node - leaves
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        room[node] -= sizes[i]
        node //= 2
        while node:
            room[node] = max(room[2 * node], room[2 * node + 1])
            node //= 2
    return bins


def pack_examples(examples: list[Example], max_length: int, seed: int = 0) -> list[list[Example]]:
    """Rows of whole examples, at most max_length tokens each: first-fit decreasing.

    The seed only orders examples of equal length, so the number of rows and their lengths
    do not depend on it.
    """
    for n, ex in enumerate(examples):
        if len(ex) > max_length:
            raise DataError(f"example {n} has {len(ex)} tokens, more than max_length={max_length};"
                            " truncate it first (encode_conversation does)")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: -len(examples[i]))  # stable: equal lengths keep the seeded order
    sizes = [len(ex) for ex in examples]
    return [[examples[i] for i in b] for b in _first_fit(sizes, order, max_length)]


def _long_tensor(values: list[int]) -> torch.Tensor:
    """torch.tensor(values) without its per-element cost (a fifth of streamed data's time): a
    typed array's buffer, viewed (the caller copies it into the batch)."""
    return torch.frombuffer(array("q", values), dtype=torch.long) if values else \
        torch.zeros(0, dtype=torch.long)


def collate(rows: list[list[Example]], pad_id: int, packed: bool) -> dict[str, torch.Tensor]:
    """Tensors for rows of examples, right-padded to the longest row.

    packed: input_ids, labels, position_ids restarting at 0 for each example and for the
    trailing padding (its own segment), no attention_mask. Not packed: one example per row,
    attention_mask 1/0, position_ids 0..n-1. The first token of every example has label
    IGNORE: with the shifted next-token loss, the previous example's last token must not be
    trained to predict it. Padding has label IGNORE whatever its id (pad may equal eos).
    """
    if not rows or any(not row for row in rows):
        raise ValueError("collate needs at least one row and no empty row")
    if not packed and any(len(row) > 1 for row in rows):
        raise ValueError("rows of several examples need packed=True (position_ids segments)")
    width = max(sum(len(ex) for ex in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE, dtype=torch.long)
    position_ids = torch.arange(width).repeat(len(rows), 1)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for ex in row:
            end = at + len(ex)
            input_ids[r, at:end] = _long_tensor(ex.input_ids)
            labels[r, at:end] = _long_tensor(ex.labels)
            labels[r, at] = IGNORE
            position_ids[r, at:end] = torch.arange(len(ex))
            attention_mask[r, at:end] = 1
            at = end
        if packed:  # unpacked padding is masked instead, its positions do not matter
            position_ids[r, at:] = torch.arange(width - at)
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    if not packed:
        batch["attention_mask"] = attention_mask
    return batch


def collate_images(rows: list[list[ImageExample]], pad_id: int) -> dict[str, torch.Tensor]:
    """An image batch: one example per row, right-padded with attention_mask and no
    position_ids (Qwen2.5-VL computes its 3-D rotary positions from the ids, the image grids
    and the mask); each image tensor the rows' tensors joined along the image axis."""
    if any(len(row) != 1 for row in rows):
        raise ValueError("image examples are never packed: one example per row")
    batch = collate(rows, pad_id, packed=False)
    del batch["position_ids"]
    examples = [row[0] for row in rows]
    keys = sorted({k for ex in examples for k in ex.image_inputs})
    batched, width = any(k in BATCHED_LAYOUT for k in keys), batch["input_ids"].shape[1]
    for key in keys:
        tensors = [ex.image_inputs.get(key) for ex in examples]
        batch[key] = (_pad_token_rows(tensors, width) if key in PER_TOKEN_INPUTS
                      else _join_images(tensors, key, batched, width))
    return batch


# Image inputs with one value a token (Gemma 3's token_type_ids, Qwen3-VL's mm_token_type_ids:
# 1 at image tokens): right-padded with 0 (text) like input_ids, a row for each example.
PER_TOKEN_INPUTS = ("token_type_ids", "mm_token_type_ids")


def _pad_token_rows(tensors: list, width: int) -> torch.Tensor:
    out = torch.zeros((len(tensors), width), dtype=torch.long)
    for r, t in enumerate(tensors):
        if t is not None:
            out[r, :t.shape[-1]] = t[0]
    return out


# Inputs that mark a family's processor output as batched: (1, images, ...) a row, padded with
# all-zero images up to the most images in a row (Idefics3/SmolVLM's pixel_attention_mask,
# mllama's aspect_ratio_ids). Every other family's image inputs are per image, concatenated
# (pixel_values of patches, of whole images or LLaVA-NeXT's (images, tiles, C, H, W);
# image_grid_thw; image_sizes), so a text-only row adds nothing to them.
BATCHED_LAYOUT = ("pixel_attention_mask", "aspect_ratio_ids")
CROSS_ATTENTION = "cross_attention_mask"  # mllama's (1, tokens, images, tiles): who sees what


def _join_images(tensors: list, key: str, batched: bool, width: int) -> torch.Tensor:
    """The rows' tensors joined along the first axis, every other axis zero-padded to the
    longest. Batched layout: a row without images gets one all-zero entry (no image: Idefics3
    drops all-zero images, mllama's cross_attention_mask lets no token see it), as the
    families' processors pad a batch; mllama's padded images keep tile 0 in aspect_ratio_mask,
    as its processor writes them. Per-image layout: rows without images add nothing.
    mllama's cross_attention_mask (1, tokens, images, tiles) is padded to the batch's `width`
    tokens, which a longer text-only row sets."""
    present = [t for t in tensors if t is not None]
    shape = [max(t.shape[d] for t in present) for d in range(1, present[0].dim())]
    if key == CROSS_ATTENTION:
        shape[0] = width
    padded = []
    for t in tensors if batched else present:
        out = torch.zeros((1 if t is None else t.shape[0], *shape), dtype=present[0].dtype)
        if key == "aspect_ratio_mask":
            out[..., 0] = 1
        if t is not None:
            out[tuple(slice(0, n) for n in t.shape)] = t
        padded.append(out)
    return torch.cat(padded)


def epoch_rows(examples: list[Example], max_length: int, packing: bool, seed: int,
               epoch: int, window: int = 0) -> list[list[Example]]:
    """The rows of one epoch in training order: a pure function of (examples, seed, epoch).
    With packing the number of rows is the same for every epoch. `window`: the index of a
    streamed window of the epoch (data/batch_stream.py); window 0 is seeded as a whole epoch,
    so a window holding the whole file gives the in-memory rows."""
    # A string seed is hashed with SHA-512: the same order in every process and Python run.
    rng = random.Random(f"loratune-data:{seed}:{epoch}" + (f":{window}" if window else ""))
    if packing:
        rows = pack_examples(examples, max_length, seed=rng.randrange(2**32))
    else:
        rows = [[ex] for ex in examples]
    rng.shuffle(rows)
    return rows


def batches(examples: list[Example], batch_size: int, max_length: int, packing: bool,
            pad_id: int, seed: int, epoch: int) -> list[dict[str, torch.Tensor]]:
    """All micro-batches of one epoch (the last may be smaller; image rows: see image_batches),
    deterministic in (seed, epoch)."""
    rows = epoch_rows(examples, max_length, packing, seed, epoch)
    if examples and isinstance(examples[0], ImageExample):
        return [collate_images(group, pad_id) for group in image_batches(rows, batch_size)]
    return [collate(rows[i:i + batch_size], pad_id, packing)
            for i in range(0, len(rows), batch_size)]


def image_batches(rows: list[list[ImageExample]], batch_size: int) -> list[list]:
    """Image rows in micro-batches of batch_size, in order. A cross-attention family's rows
    (mllama: a cross_attention_mask) share a batch only with rows of as many images, the
    rest of a count's rows batched at the end: a token that sees no image (a text-only row,
    a prompt before its first image) attends evenly to every image of its row, the batch's
    blank padding images included, so a row with fewer images than the batch's most, or
    none, would not have its loss alone. The number of batches does not depend on the order."""
    if not any(CROSS_ATTENTION in row[0].image_inputs for row in rows):
        return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    out, groups = [], {}
    for row in rows:
        inputs = row[0].image_inputs
        count = inputs[CROSS_ATTENTION].shape[2] if CROSS_ATTENTION in inputs else 0
        group = groups.setdefault(count, [])
        group.append(row)
        if len(group) == batch_size:
            out.append(groups.pop(count))
    return out + list(groups.values())


def padding_share(rows: list[list[Example]], batch_size: int) -> float:
    """Share of padding among all tokens when `rows` are batched in order."""
    total = padded = 0
    for i in range(0, len(rows), batch_size):
        lengths = [sum(len(ex) for ex in row) for row in rows[i:i + batch_size]]
        total += max(lengths) * len(lengths)
        padded += max(lengths) * len(lengths) - sum(lengths)
    return padded / max(total, 1)


def should_pack(examples: list[Example], max_length: int, batch_size: int) -> bool:
    """For `packing: auto`. Pack when unpacked batches would be more than 20% padding and
    packing at least halves that share, or when a row holds two or more examples on average:
    then packing fills rows up to max_length (fewer, fuller steps) at no cost in padding, and
    the block-diagonal mask keeps each example's loss what it would be alone."""
    if len(examples) < 2:
        return False
    mean = sum(len(ex) for ex in examples) / len(examples)
    if 2 * mean <= max_length:
        return True
    # Estimated on one shuffled order: batches are shuffled, whatever the file order.
    plain = padding_share(epoch_rows(examples, max_length, False, 0, 0), batch_size)
    if plain <= PAD_SHARE_TO_PACK:
        return False
    packed = padding_share(epoch_rows(examples, max_length, True, 0, 0), batch_size)
    return packed <= plain / 2
