"""The first serving loop's batch, kept behind `kv_cache="dynamic"`: a transformers DynamicCache.

Joining rows are prefilled left-padded and their cache is concatenated to the batch's, each
side left-padded to the common length; every decode step grows each layer's cache by one
column (a concatenation per layer) and the 2D padding mask by one. It serves every model
transformers can cache (sliding windows, flash-attention), which the slot cache refuses.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache

from loratune.serve.image_rows import ImageRows
from loratune.serve.multi_lora import RowSlots
from loratune.serve.prefill_rows import prefill_rows, row_columns


class DynamicBatch:
    """Running rows over a DynamicCache, left-padded to a common length."""

    def __init__(self, model: nn.Module, cache_key: str, row_slots: RowSlots,
                 device: torch.device, images: ImageRows | None = None):
        self.model, self.cache_key, self.row_slots, self.device = model, cache_key, row_slots, device
        self.images = images              # the vision side of a VLM (image_rows.py)
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None     # [rows, cached columns]; 0 = left padding

    def prefill(self, seqs: list) -> torch.Tensor:
        """One forward over the new prompts (left-padded, each row with its adapter and after
        its virtual tokens: prefill_rows.py); their cache joins the batch's. Returns the last
        prompt token's logits per new row."""
        rows = prefill_rows(self.model, seqs, self.device, self.images)
        cache, mask = DynamicCache(), rows.real.long()
        if rows.prefix_columns:
            mask = torch.cat([prefix_cache(cache, rows.prefixes, rows.prefix_columns), mask], 1)
        self.row_slots.set([s.slot for s in seqs], self.device)
        inputs = {"input_ids": rows.ids} if rows.embeds is None else \
            {"inputs_embeds": rows.embeds}
        out = self.model(**inputs, attention_mask=mask, position_ids=rows.position_ids,
                         **{self.cache_key: cache}, use_cache=True, logits_to_keep=1,
                         **rows.extra)
        self._join(cache, mask)
        return out.logits[:, -1]

    def decode(self, seqs: list) -> torch.Tensor:
        """One token for every running row; the logits of each."""
        last = torch.tensor([[s.tokens[-1]] for s in seqs], device=self.device)
        # a row's position is its column plus its shift (multimodal RoPE after an image)
        pos = torch.tensor([[row_columns(s) - 1 + s.position_shift] for s in seqs],
                           device=self.device)
        mask = torch.cat([self.mask, self.mask.new_ones(len(seqs), 1)], dim=1)
        self.row_slots.set([s.slot for s in seqs], self.device)
        out = self.model(input_ids=last, attention_mask=mask, position_ids=pos,
                         **{self.cache_key: self.cache}, use_cache=True, logits_to_keep=1)
        self.mask = mask
        return out.logits[:, -1]

    def keep(self, keep: list[int]) -> list[int]:
        """Shrink the batch to rows `keep`; returns them in their new order (unchanged here)."""
        if not keep:
            self.reset()
            return []
        index = torch.tensor(keep, device=self.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask.index_select(0, index)
        # Columns that are padding in every remaining row are dead weight: cut them.
        first = int(self.mask.any(0).int().argmax())
        if first:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
            self.mask = self.mask[:, first:]
        return keep

    def reset(self) -> None:
        self.cache, self.mask = None, None

    def _join(self, cache: DynamicCache, new_mask: torch.Tensor) -> None:
        """Add prefilled rows to the batch cache, left-padding whichever side is shorter."""
        if self.cache is None:
            self.cache, self.mask = cache, new_mask
            return
        width = max(self.mask.shape[1], new_mask.shape[1])
        for old, new in zip(self.cache.layers, cache.layers):
            old.keys = torch.cat([left_pad(old.keys, width), left_pad(new.keys, width)], 0)
            old.values = torch.cat([left_pad(old.values, width), left_pad(new.values, width)], 0)
        self.mask = torch.cat([left_pad(self.mask, width, dim=1),
                               left_pad(new_mask, width, dim=1)], 0)


def prefix_cache(cache: DynamicCache, prefixes: list, width: int) -> torch.Tensor:
    """Put each row's prefix keys and values (prefix tuning) into `cache`, right-aligned in
    `width` columns; returns their 2D mask [rows, width] (rows without one: all padding)."""
    have = next(kv for kv in prefixes if kv)
    mask = torch.zeros(len(prefixes), width, dtype=torch.long, device=have[0][0].device)
    for layer in range(len(have)):
        heads, _, dim = have[layer][0].shape
        keys, values = (have[layer][0].new_zeros(len(prefixes), heads, width, dim)
                        for _ in range(2))
        for i, kv in enumerate(prefixes):
            if kv:
                n = kv[layer][0].shape[-2]
                keys[i, :, width - n:], values[i, :, width - n:] = kv[layer]
                mask[i, width - n:] = 1
        cache.update(keys, values, layer)
    return mask


def left_pad(t: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """Zero-pad `t` on the left of `dim` up to `width`."""
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)
