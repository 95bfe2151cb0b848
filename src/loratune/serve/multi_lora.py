"""Mixed-adapter batches: every row of a batch may use a different LoRA, in one forward.

Each target linear layer keeps the pool's adapters stacked into slots: A [S, r, in] and
B·scale [out, S, r], slot 0 all zeros (the base model), ranks zero-padded to the largest.
The base matmul runs once for the whole batch. The LoRA part takes one of three paths:

- every row on one slot: two plain matmuls;
- a decode step (one token per row) with no more slots than rows: one matmul against all
  slots' A at once, the other slots' columns zeroed per row, one matmul against all B — two
  GEMMs and no per-row weight copies, which is what a launch-bound GPU step wants;
- otherwise (a prefill, or more slots than rows): each row's A and B gathered by its slot
  index, then two batched matmuls (the BGMV idea of Punica / S-LoRA).

All three compute the same sum; zeroed columns add exact zeros. The products themselves are
adapters/lora_product.py's (its backends); this module keeps the slots and picks the path.

Methods that scale channels (DoRA's magnitude, IA³'s vectors: registry.RowForm) also fill
per-slot vectors, gathered per row: y = out_scale·(base(in_scale·x) + LoRA) + out_shift. A slot
without them holds ones and zeros, which change nothing exactly; a layer none of whose slots
has them skips the step.
"""

from __future__ import annotations

import torch
from torch import nn

from loratune.adapters.lora_product import backend as lora_backend


def slot_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype a layer's LoRA slots are stored and multiplied in: its weight's, or the
    compute dtype of a 4-bit layer (whose weight is packed integers)."""
    layer = getattr(layer, "base_layer", layer)
    w = getattr(layer, "weight", None)
    if w is not None and w.dtype.is_floating_point:
        return w.dtype
    return getattr(layer, "compute_dtype", torch.float32)


class RowSlots:
    """The slot index of each row of the batch being run (shared by all layers of a model)."""

    def __init__(self, num_slots: int = 1):
        self.num_slots = num_slots
        self.rows: torch.Tensor | None = None   # [batch] long, on the model's device
        self.uniform: int | None = None         # the slot when every row uses the same one
        self.others: torch.Tensor | None = None  # [batch, slots, 1]: row b does not use slot s
        # A forward recorded once and replayed (a CUDA graph) must not branch on which slots
        # are filled or shared: with `static` set every layer takes a path fixed by shapes.
        self.static = False
        # Bumped whenever a layer's slot tensors are (re)allocated (a layer's first adapter, a
        # larger rank): a recorded forward holds the old tensors' addresses, or skipped a layer
        # that had none, and must be recorded again.
        self.generation = 0

    def set(self, slots: list[int], device: torch.device) -> None:
        self.use(torch.tensor(slots, dtype=torch.long, device=device),
                 slots[0] if len(set(slots)) == 1 else None)

    def use(self, rows: torch.Tensor, uniform: int | None = None) -> None:
        """Run the next forwards with slot `rows` (a tensor the caller may refill in place)."""
        self.rows, self.uniform = rows, uniform
        self.others = (rows[:, None] != torch.arange(self.num_slots, device=rows.device))[..., None]
        self._others_flat: dict[int, torch.Tensor] = {}
        self._row_index: dict[int, torch.Tensor] = {}

    def row_index(self, slot: int) -> torch.Tensor:
        """The rows that use `slot` (made once per batch, shared by every layer; on a GPU the
        first call per slot waits for the device)."""
        index = self._row_index.get(slot)
        if index is None:
            index = self._row_index[slot] = (self.rows == slot).nonzero().flatten()
        return index

    def others_flat(self, rank: int) -> torch.Tensor:
        """[batch, slots·rank] bool: the columns of slots row b does not use (made once per
        batch and rank, shared by the layers of that rank)."""
        flat = self._others_flat.get(rank)
        if flat is None:
            b, s, _ = self.others.shape
            flat = self._others_flat[rank] = self.others.expand(b, s, rank).reshape(b, s * rank)
        return flat


class MultiLoraLinear(nn.Module):
    """A frozen linear layer plus slot-stacked LoRA weights, chosen per row by `RowSlots`."""

    def __init__(self, base_layer: nn.Module, slots: RowSlots, num_slots: int,
                 backend: str = "torch"):
        super().__init__()
        self.base_layer = base_layer
        self.backend = lora_backend(backend)   # adapters/lora_product.py runs the product
        self.row_slots = slots
        self.num_slots = num_slots
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        # Buffers, not parameters: nothing here trains, and they follow .to(device).
        self.register_buffer("lora_A", None, persistent=False)
        self.register_buffer("lora_B", None, persistent=False)
        # [slots, in], [slots, out], [slots, out]: RowForm's per-channel parts (None: no slot
        # of this layer has any yet)
        self.register_buffer("in_scale", None, persistent=False)
        self.register_buffer("out_scale", None, persistent=False)
        self.register_buffer("out_shift", None, persistent=False)
        self.filled: set[int] = set()           # slots holding a nonzero update here
        self.scaled: set[int] = set()           # slots holding per-channel scales here

    # The base's weight and bias, as the training host (adapters/host.py) exposes them: code that
    # reads a layer's weight directly (torch's MultiheadAttention reads out_proj.weight, in
    # SigLIP's pooling head) sees the frozen base layer's.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def _grow(self, rank: int, device: torch.device) -> None:
        """Make room for rank `rank`, keeping the slots already filled."""
        old = 0 if self.lora_A is None else self.lora_A.shape[1]
        if rank <= old:
            return
        dtype = slot_dtype(self.base_layer)
        a = torch.zeros(self.num_slots, rank, self.in_features, device=device, dtype=dtype)
        # [out, slots, rank]: viewed as [out, slots·rank] it is the B of every slot side by side.
        b = torch.zeros(self.out_features, self.num_slots, rank, device=device, dtype=dtype)
        if old:
            a[:, :old] = self.lora_A
            b[:, :, :old] = self.lora_B
        self.lora_A, self.lora_B = a, b
        self._flat_views()
        self.row_slots.generation += 1

    def _flat_views(self) -> None:
        """Every slot side by side, as the all-slots path multiplies: Aᵀ [in, S·r] and
        Bᵀ [S·r, out] (views of lora_A and lora_B, plain attributes: read on every step)."""
        a, b = self.lora_A, self.lora_B
        self.a_all = a.view(-1, self.in_features).t()
        self.b_all = b.view(self.out_features, -1).t()

    def _apply(self, fn, recurse=True):
        # .to(device) / .half() replace the buffers: the views must follow them.
        super()._apply(fn, recurse)
        if self.lora_A is not None:
            self._flat_views()
        return self

    @torch.no_grad()
    def fill(self, slot: int, a: torch.Tensor, b_scaled: torch.Tensor) -> None:
        """Put A [r, in] and scale·B [out, r] into `slot` (ranks beyond r stay zero)."""
        if a.shape[1] != self.in_features or b_scaled.shape[0] != self.out_features:
            raise ValueError(f"LoRA shapes A {tuple(a.shape)}, B {tuple(b_scaled.shape)} do not fit "
                             f"a {self.in_features}→{self.out_features} layer")
        self._grow(a.shape[0], self._device())
        self.clear(slot)
        r = a.shape[0]
        self.lora_A[slot, :r] = a.to(self.lora_A.dtype)
        self.lora_B[:, slot, :r] = b_scaled.to(self.lora_B.dtype)
        self.filled.add(slot)

    def _device(self) -> torch.device:
        # A 4-bit base layer keeps its weight in buffers, so look at both.
        base = self.base_layer
        return next(t for t in [*base.parameters(), *base.buffers()]).device

    @torch.no_grad()
    def fill_scales(self, slot: int, in_scale: torch.Tensor | None = None,
                    out_scale: torch.Tensor | None = None,
                    out_shift: torch.Tensor | None = None) -> None:
        """Put a RowForm's per-channel parts into `slot` (the others stay 1, 1 and 0)."""
        if self.in_scale is None:
            kw = {"device": self._device(), "dtype": slot_dtype(self.base_layer)}
            self.in_scale = torch.ones(self.num_slots, self.in_features, **kw)
            self.out_scale = torch.ones(self.num_slots, self.out_features, **kw)
            self.out_shift = torch.zeros(self.num_slots, self.out_features, **kw)
            self.row_slots.generation += 1
        self.clear_scales(slot)
        for table, t in ((self.in_scale, in_scale), (self.out_scale, out_scale),
                         (self.out_shift, out_shift)):
            if t is not None:
                table[slot] = t.to(table.dtype)
        self.scaled.add(slot)

    @torch.no_grad()
    def clear(self, slot: int) -> None:
        if slot in self.filled:
            self.lora_A[slot].zero_()
            self.lora_B[:, slot].zero_()
            self.filled.discard(slot)
        self.clear_scales(slot)

    @torch.no_grad()
    def clear_scales(self, slot: int) -> None:
        if slot in self.scaled:
            self.in_scale[slot] = 1
            self.out_scale[slot] = 1
            self.out_shift[slot] = 0
            self.scaled.discard(slot)

    def _row_scales(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Each row's (in_scale, out_scale, out_shift), broadcastable over [batch, tokens, ·];
        None when no row of the batch needs them."""
        slots = self.row_slots
        if slots.rows is None or self.in_scale is None or not (self.scaled or slots.static):
            return None
        if slots.uniform is not None:
            if slots.uniform not in self.scaled and not slots.static:
                return None
            return (self.in_scale[slots.uniform], self.out_scale[slots.uniform],
                    self.out_shift[slots.uniform])
        rows = slots.rows
        return tuple(t.index_select(0, rows)[:, None, :]
                     for t in (self.in_scale, self.out_scale, self.out_shift))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.row_slots.rows
        if x.dim() > 3 and rows is not None and x.shape[0] == rows.shape[0]:
            # MLA (DeepSeek) runs kv_b_proj on its cached latents [batch, 1, tokens, rank]
            return self.forward(x.flatten(1, -2)).unflatten(1, x.shape[1:-1])
        scales = self._row_scales()
        if scales is None:
            return self._lora_forward(x)
        x = x * scales[0].to(x.dtype)
        out = self._lora_forward(x)
        return torch.addcmul(scales[2].to(out.dtype), out, scales[1].to(out.dtype))

    def _lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        slots = self.row_slots
        rows = slots.rows
        if rows is None or self.lora_A is None or not (self.filled or slots.static):
            return out
        if slots.uniform is not None:
            return self._one_slot(x, out, slots.uniform)
        if x.dim() != 3 or x.shape[0] != rows.shape[0]:
            raise RuntimeError(f"batch of {tuple(x.shape)} does not match {rows.numel()} row slots")
        if x.shape[1] == 1 and self.num_slots <= x.shape[0]:
            return self._all_slots(x, out)
        return self._gathered(x, out, rows)

    def _one_slot(self, x: torch.Tensor, out: torch.Tensor, slot: int) -> torch.Tensor:
        """One adapter for the whole batch: two plain matmuls, no gather."""
        if slot not in self.filled:
            return out
        return self.backend.one_slot(out, x, self.lora_A[slot], self.lora_B[:, slot])

    def _all_slots(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """x [batch, 1, in]: every slot's A at once, other rows' slots zeroed, every slot's B."""
        rank = self.lora_A.shape[1]
        return self.backend.all_slots(out, x, self.a_all, self.b_all,
                                      self.row_slots.others_flat(rank))

    def _gathered(self, x: torch.Tensor, out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Each row's own A and B gathered by slot, then two batched matmuls."""
        return self.backend.gathered(out, x, self.lora_A, self.lora_B, rows)


def detach(model: nn.Module) -> None:
    """Put the plain linear layers back (a model is served by one pool at a time)."""
    for path, mod in list(model.named_modules()):
        if isinstance(mod, MultiLoraLinear):
            parent_name, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, mod.base_layer)


def attach(model: nn.Module, paths: list[str], slots: RowSlots, num_slots: int,
           backend: str = "torch") -> dict[str, MultiLoraLinear]:
    """Wrap the linear layers at `paths` (skipping ones already wrapped); return all wrappers."""
    layers = {name: mod for name, mod in model.named_modules() if isinstance(mod, MultiLoraLinear)}
    for path in paths:
        if path in layers:
            continue
        parent_name, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        if not hasattr(base, "in_features"):
            raise ValueError(f"{path} is a {type(base).__name__}, not a linear layer")
        wrapper = MultiLoraLinear(base, slots, num_slots, backend)
        setattr(parent, child, wrapper)
        layers[path] = wrapper
    return layers
