"""Nonlinear adapters per row: each slot's RowBlock at a module path, run on its rows only.

A bottleneck block (up(act(down(h))) on a sublayer's output) or MoE-LoRA's routed experts are
no LoRA product and no channel scale, so they cannot live in the slot-stacked tensors of
multi_lora.py. A method whose record gives `ServingSpec.blocks` hands the server a small float32
module per path (registry.RowBlock); `RowBlocks` runs each slot's module on the rows of that
slot — gathered by the slot's row index, run, added back with index_add — so a row of another
slot, or of the base, is left exactly as it was. A batch all on one slot runs it ungathered.

A decode step recorded as a CUDA graph (`RowSlots.static`) must not gather by a row count it
cannot know: there every block runs on all rows and keeps its own rows' delta (torch.where, so
a value a block makes of another row's input cannot leak in). Which blocks a path has is part
of the recording, so adding or dropping one bumps `RowSlots.generation`.

The blocks sit on the module as a forward hook, not a wrapper: a wrapper around `self_attn`
would move every linear layer beneath it (and the LoRA slots there) to another path. On a
layer the LoRA slots wrap, the hook goes on the wrapped linear, so the two never nest.
"""

from __future__ import annotations

import copy
import weakref

import torch
from torch import nn

from loratune.adapters.registry import RowBlock
from loratune.serve.multi_lora import MultiLoraLinear, RowSlots

# module -> its RowBlocks, so that detach() finds every hook a pool left on a model
_HOOKED: weakref.WeakKeyDictionary[nn.Module, RowBlocks] = weakref.WeakKeyDictionary()


class RowBlocks:
    """The RowBlocks of every slot at one module path, run as that module's forward hook."""

    def __init__(self, module: nn.Module, path: str, slots: RowSlots):
        self.path, self.row_slots = path, slots
        self.blocks: dict[int, RowBlock] = {}
        self.device = next(t.device for t in [*module.parameters(), *module.buffers()])
        self.handle = module.register_forward_hook(self, with_kwargs=True)

    def fill(self, slot: int, block: RowBlock) -> None:
        """Run `block` for the rows of `slot` (a copy on the module's device, in eval mode)."""
        module = block.module
        if any(t.device != self.device for t in module.state_dict().values()):
            module = copy.deepcopy(module).to(self.device)   # the host tier keeps its CPU copy
        self.blocks[slot] = RowBlock(module.eval().requires_grad_(False), block.reads)
        self.row_slots.generation += 1

    def clear(self, slot: int) -> None:
        if self.blocks.pop(slot, None) is not None:
            self.row_slots.generation += 1

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output):
        if self.row_slots.rows is None or not self.blocks:
            return output
        h = output[0] if isinstance(output, tuple) else output
        inputs = args[0] if args else kwargs.get("hidden_states")
        h = self._add(h, inputs)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    def _add(self, h: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        slots = self.row_slots
        if slots.uniform is not None and not slots.static:
            block = self.blocks.get(slots.uniform)
            return h if block is None else h + self._delta(block, x, h)
        if h.shape[0] != slots.rows.shape[0]:
            raise RuntimeError(f"{self.path}: batch of {tuple(h.shape)} does not match "
                               f"{slots.rows.numel()} row slots")
        for slot, block in self.blocks.items():
            if slots.static:
                mine = (slots.rows == slot).view(-1, *[1] * (h.dim() - 1))
                h = h + torch.where(mine, self._delta(block, x, h), 0)
                continue
            rows = slots.row_index(slot)
            if rows.numel():
                picked = None if x is None else x.index_select(0, rows)
                h = h.index_add(0, rows, self._delta(block, picked, h.index_select(0, rows)))
        return h

    def _delta(self, block: RowBlock, x: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
        if block.reads == "output":
            return block.module(h).to(h.dtype)
        if x is None:
            raise RuntimeError(f"{self.path}: a block reading the module's input needs it as the "
                               "first argument or hidden_states=, and the call gave neither")
        return block.module(x).to(h.dtype)


def attach_blocks(model: nn.Module, paths: list[str], slots: RowSlots) -> dict[str, RowBlocks]:
    """The RowBlocks at each of `paths` (made and hooked on first use)."""
    found = {}
    for path in paths:
        module = model.get_submodule(path)
        if isinstance(module, MultiLoraLinear):
            module = module.base_layer     # the same module whether or not LoRA slots wrap it
        blocks = _HOOKED.get(module)
        if blocks is None or blocks.row_slots is not slots:
            if blocks is not None:
                blocks.handle.remove()
            blocks = _HOOKED[module] = RowBlocks(module, path, slots)
        found[path] = blocks
    return found


def detach_blocks(model: nn.Module) -> None:
    """Remove every RowBlocks hook from `model` (a model is served by one pool at a time)."""
    for module in model.modules():
        blocks = _HOOKED.pop(module, None)
        if blocks is not None:
            blocks.handle.remove()
