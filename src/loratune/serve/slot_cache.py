"""The running batch's KV cache: one preallocated row per request, written in place.

Per attention layer one key and one value tensor [rows, kv_heads, columns + 1, head_dim]. Row i
holds running request i, column j its token at position j; a decode step writes one column per
row where that row is (rows at different lengths need no padding), and attention reads the
first W columns of the first B rows as a view, W the longest row (a power-of-two bucket of it
when the step is recorded as a CUDA graph). The
extra last column is scratch: the left padding of a joint prefill is written there and never
read. Rows that leave are filled by moving the last rows into their place, so the running
rows stay 0..B-1 and nothing is concatenated or copied per step.

The model sees an ordinary transformers `Cache`: its attention layers call `update`, which
writes the new keys and values and returns what to attend to; the masks come from the engine
as 4D additive tensors, so which columns a row sees is decided here, not by transformers.
"""

from __future__ import annotations

import torch
from transformers import Cache

FULL = "full_attention"


def bucket(n: int, cap: int, smallest: int = 16) -> int:
    """The power of two ≥ n (at least `smallest`), at most `cap`: few distinct shapes."""
    width = smallest
    while width < n:
        width *= 2
    return min(width, cap)


def slot_cache_refusal(model, columns: int) -> str | None:
    """Why this model cannot run on a SlotCache (None when it can).

    The slot cache attends with full causal masks given as 4D tensors: attention that takes no
    4D mask (flash-attention, flex), sliding-window or linear-attention layers, and
    encoder-decoder models are refused by name (the engine then keeps its dynamic cache).
    """
    cfg = model.config
    attn = getattr(cfg, "_attn_implementation", None) or "eager"
    if getattr(cfg, "vision_config", None) is not None:
        cfg = cfg.get_text_config()     # a VLM's layers and window are its text model's
    if attn not in ("eager", "sdpa"):
        return f"attention implementation {attn!r} takes no 4D mask (eager and sdpa do)"
    if getattr(cfg, "is_encoder_decoder", False):
        return f"{type(model).__name__} is an encoder-decoder model"
    kinds = set(getattr(cfg, "layer_types", None) or [FULL])
    if kinds != {FULL}:
        return f"layer types {sorted(kinds)}: only full attention layers are served from slots"
    window = getattr(cfg, "sliding_window", None)
    if window and getattr(cfg, "use_sliding_window", True) and window < columns:
        return (f"sliding-window attention ({window} tokens) with a context of {columns} "
                "tokens")
    return None


class SlotCache(Cache):
    """Per-layer [rows, kv_heads, columns + 1, head_dim] keys and values, rows = batch slots.

    `columns` is the longest context a row may reach. With `preallocate` every layer gets all
    of it on first use (a GPU server then fails at its first request, not mid-run); otherwise
    the columns grow by doubling as rows get longer (memory follows use, as on a CPU).
    """

    def __init__(self, rows: int, columns: int, preallocate: bool = False):
        # Not Cache.__init__: this cache has no CacheLayer objects, only its own tensors.
        self.layers = []
        self.layer_class_to_replicate = None
        self.offloading = False
        self.rows, self.columns = rows, columns
        self.capacity = columns if preallocate else min(columns, 256)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.generation = 0           # bumped when the tensors are replaced (growth)
        self._mode = ""
        self._index: torch.Tensor | None = None   # where the next update writes
        self._first = 0                          # prefill: the first row written
        self._width: int | None = 0              # columns attended to (prefill: None = new)
        self._prefixes: list = []                # prefill: (row, per-layer K, V) to write

    @property
    def trash(self) -> int:
        """The scratch column: padding goes there, no mask lets it be read."""
        return self.capacity

    # -- what the engine calls ----------------------------------------------------------------
    def reserve(self, columns: int) -> None:
        """Make room for rows of `columns` tokens (doubling, up to the maximum context)."""
        if columns > self.columns:
            raise ValueError(f"a row of {columns} tokens does not fit the cache's {self.columns}")
        if columns <= self.capacity:
            return
        new = self.capacity
        while new < columns:
            new *= 2
        new = min(new, self.columns)
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                grown = old.new_zeros(old.shape[0], old.shape[1], new + 1, old.shape[3])
                grown[:, :, :self.capacity] = old[:, :, :self.capacity]
                store[i] = grown
        self.capacity = new
        self.generation += 1

    def prefill(self, first: int, columns: torch.Tensor, prefixes: list | None = None,
                width: int | None = None) -> None:
        """The next forward is a prefill of rows first.. ; token t of row b goes to column
        columns[b, t] (the trash column for padding). `prefixes[b]`: per layer (keys, values)
        [1 or kv_heads.., n, head_dim] written to columns 0..n-1 of row b (prefix tuning), or
        None. Attention sees the rows' first `width` columns (None: the new tokens only).

        The rows are zeroed first: a decode step reads columns past a row's own length under
        a mask, and a mask does not hide what a previous request left there if it is NaN or
        inf (NaN + mask is NaN; a zero weight times NaN is NaN).
        """
        rows = slice(first, first + columns.shape[0])
        for t in (*self.keys, *self.values):
            t[rows].zero_()
        self._mode, self._first, self._index = "prefill", first, columns
        self._prefixes = [(first + b, kv) for b, kv in enumerate(prefixes or []) if kv]
        self._width = width

    def decode(self, positions: torch.Tensor, width: int) -> None:
        """The next forward is one token per row 0..B-1, written at column positions[b];
        attention sees each row's first `width` columns (the mask hides the rest)."""
        self._mode, self._index, self._width = "decode", positions, width

    def move(self, src: list[int], dst: list[int], columns: int) -> None:
        """Copy rows `src` to rows `dst` (the first `columns` columns): closing holes."""
        if not src:
            return
        device = self.keys[0].device if self.keys else None
        if device is None:
            return
        s = torch.tensor(src, device=device)
        d = torch.tensor(dst, device=device)
        for store in (self.keys, self.values):
            for t in store:
                part = t[:, :, :columns]
                part.index_copy_(0, d, part.index_select(0, s))

    # -- what the model calls -----------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx == len(self.keys):
            self._allocate(key_states, value_states)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        n = key_states.shape[0]
        # keys and values each by their own shape: MLA (DeepSeek) caches a latent [n, 1, t,
        # kv_lora_rank] as keys and the rotary key [n, 1, t, qk_rope_head_dim] as values
        if self._mode == "prefill":
            rows = slice(self._first, self._first + n)
            for store, new in ((keys, key_states), (values, value_states)):
                store[rows].scatter_(2, self._index[:, None, :, None].expand(new.shape), new)
            for row, kv in self._prefixes:
                k, v = kv[layer_idx]
                keys[row, :, :k.shape[-2]] = k
                values[row, :, :v.shape[-2]] = v
            if self._width is None:
                return key_states, value_states
            return keys[rows, :, :self._width], values[rows, :, :self._width]
        if self._mode != "decode":
            raise RuntimeError("SlotCache.update before prefill() or decode()")
        for store, new in ((keys, key_states), (values, value_states)):
            store[:n].scatter_(2, self._index[:, None, None, None].expand(new.shape), new)
        return keys[:n, :, :self._width], values[:n, :, :self._width]

    def _allocate(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        for store, like in ((self.keys, keys), (self.values, values)):
            store.append(like.new_zeros(self.rows, like.shape[1], self.capacity + 1,
                                        like.shape[3]))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._width if self._mode == "decode" else 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.columns

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return bool(self.keys)

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self.keys)
