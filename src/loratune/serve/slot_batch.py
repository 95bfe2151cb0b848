"""The running batch over a SlotCache: prefill into free rows, decode all rows in place.

A decode step is one forward whose inputs are built as tensors in one host-to-device copy
(last tokens, positions, adapter slots); the mask is computed from the positions on the
device, each row's adapter is picked by the layers' slot gather (multi_lora.py), and the cache
is written in place. With `graphs` the step is recorded once per shape and replayed
(decode_graphs.py).
"""

from __future__ import annotations

import threading
import warnings

import torch
from torch import nn

from loratune.serve.decode_graphs import DecodeGraphs, GraphError, cuda_capture, eager_capture
from loratune.serve.image_rows import ImageRows
from loratune.serve.multi_lora import RowSlots
from loratune.serve.prefill_rows import prefill_rows, row_columns
from loratune.serve.slot_cache import SlotCache, bucket


class SlotBatch:
    """Up to `rows` running requests of at most `columns` tokens each, row i = request i."""

    def __init__(self, model: nn.Module, cache_key: str, row_slots: RowSlots,
                 device: torch.device, rows: int, columns: int, preallocate: bool = False,
                 graphs: str | None = None, lock: threading.RLock | None = None,
                 images: ImageRows | None = None):
        """`graphs`: None (eager steps), "cuda" (CUDA graphs) or "eager" (the graph runner's
        padding and buffers with plain reruns: a CPU check of that path). `images`: the vision
        side of a vision-language model (image_rows.py)."""
        self.model, self.cache_key, self.row_slots, self.device = model, cache_key, row_slots, device
        self.images = images
        self.cache = SlotCache(rows, columns, preallocate)
        self.size = 0                 # running rows: 0 .. size-1
        self.longest = 0              # the most columns any running row has used
        self.graph_note: str | None = None
        self.graphs: DecodeGraphs | None = None
        if graphs is not None:
            capture = cuda_capture if graphs == "cuda" else eager_capture
            self.graphs = DecodeGraphs(self._forward_static, rows, device,
                                       lock or threading.RLock(), capture)

    # -- prefill ---------------------------------------------------------------------------------
    def prefill(self, seqs: list) -> torch.Tensor:
        """One forward over the new prompts, left-padded, written to rows size.. of the cache
        (each after its adapter's virtual tokens: prefill_rows.py). Returns the last prompt
        token's logits per new row."""
        n = len(seqs)
        if self.size + n > self.cache.rows:
            raise RuntimeError(f"{self.size + n} rows do not fit a batch of {self.cache.rows}")
        rows = prefill_rows(self.model, seqs, self.device, self.images)
        longest = max(rows.lengths)
        self.cache.reserve(longest)
        columns = torch.where(rows.real, rows.pos, self.cache.trash)
        # Attention reads the rows' cache columns (a prefix is there before the prompt): a
        # token sees its row's columns up to its own; a padding query sees column 0 only (no
        # empty softmax row; every row has a token or a prefix there).
        cols = torch.arange(longest, device=self.device)
        visible = torch.where(rows.real[..., None], cols <= rows.pos[..., None], cols == 0)
        self.row_slots.set([s.slot for s in seqs], self.device)
        self.cache.prefill(self.size, columns, rows.prefixes, longest)
        inputs = {"input_ids": rows.ids} if rows.embeds is None else \
            {"inputs_embeds": rows.embeds}
        out = self.model(**inputs, attention_mask=self._mask(visible[:, None]),
                         position_ids=rows.position_ids, **{self.cache_key: self.cache},
                         use_cache=True, logits_to_keep=1, **rows.extra)
        self.size += n
        self.longest = max(self.longest, longest)
        return out.logits[:, -1]

    # -- decode ----------------------------------------------------------------------------------
    def decode(self, seqs: list) -> torch.Tensor:
        """One token for each running row (seqs[i] is row i); the logits of each."""
        ids = [s.tokens[-1] for s in seqs]
        pos = [row_columns(s) - 1 for s in seqs]
        slots = [s.slot for s in seqs]
        shifts = [s.position_shift for s in seqs]
        need = max(pos) + 1
        self.cache.reserve(need)
        self.longest = max(self.longest, need)
        if self.graphs is not None:
            # A recorded step has fixed shapes: attend to a power-of-two bucket of columns.
            width = bucket(need, self.cache.capacity)
            try:
                return self.graphs(ids, pos, slots, shifts, width, self.cache.trash,
                                   self._version())
            except GraphError as err:
                warnings.warn(f"serving without CUDA graphs: {err}", stacklevel=2)
                self.graph_note, self.graphs = str(err), None
        host = torch.tensor([ids, pos, slots, shifts])
        dev = host.to(self.device)
        self.row_slots.use(dev[2], slots[0] if len(set(slots)) == 1 else None)
        # rows after an image under multimodal RoPE are at positions other than their columns
        return self._forward(dev[0, :, None], dev[1], need, dev[3] if any(shifts) else None)

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, width: int,
                 shift: torch.Tensor | None = None) -> torch.Tensor:
        """The decode forward on device tensors: ids [B, 1], columns [B], and each row's
        position minus its column (None: none differ)."""
        cols = torch.arange(width, device=pos.device)
        visible = cols[None, :] <= pos[:, None]                       # [B, width]
        self.cache.decode(pos, width)
        positions = pos if shift is None else pos + shift
        out = self.model(input_ids=ids, attention_mask=self._mask(visible[:, None, None]),
                         position_ids=positions[:, None], **{self.cache_key: self.cache},
                         use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    def _forward_static(self, ids: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor,
                        shifts: torch.Tensor, width: int) -> torch.Tensor:
        """The step a graph records: no branch on which adapters the rows use, nor on whether
        a row's position differs from its column."""
        self.row_slots.static = True
        try:
            self.row_slots.use(slots)
            return self._forward(ids, pos, width, shifts)
        finally:
            self.row_slots.static = False

    def _version(self) -> tuple[int, int]:
        return self.row_slots.generation, self.cache.generation

    def _mask(self, visible: torch.Tensor) -> torch.Tensor:
        """sdpa takes the boolean mask; eager attention adds it: 0 or the dtype's minimum."""
        if getattr(self.model.config, "_attn_implementation", None) == "sdpa":
            return visible
        dtype = self.model.get_input_embeddings().weight.dtype
        if not dtype.is_floating_point:
            dtype = torch.float32
        return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(
            ~visible, torch.finfo(dtype).min)

    # -- rows leaving ----------------------------------------------------------------------------
    def keep(self, keep: list[int]) -> list[int]:
        """Keep rows `keep` (old indices, ascending); rows beyond the new size move into the
        holes. Returns the old index of each new row 0..len(keep)-1."""
        k = len(keep)
        order = list(range(k))
        kept = set(keep)
        holes = [i for i in range(k) if i not in kept]
        movers = [i for i in keep if i >= k]
        for hole, mover in zip(holes, movers):
            order[hole] = mover
        self.cache.move(movers, holes, min(self.longest, self.cache.capacity))
        self.size = k
        if not k:
            self.longest = 0
        return order

    def reset(self) -> None:
        self.size, self.longest = 0, 0
