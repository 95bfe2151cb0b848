"""Move tensors saved for backward to host memory while the forward pass runs on a GPU.

With gradient checkpointing only each decoder layer's input is kept for backward (the
checkpoint saves it through the same hooks); offloading those too leaves GPU memory for one
layer's recomputation. Weights are never copied: a frozen weight saved for the input gradient
(or a transposed view of it) stays where it is, where `torch.autograd.graph.save_on_cpu` would
copy every such weight to the host on every step. Small tensors stay too (a copy costs more than
it frees). On a CPU-only run the activations already live in host memory, so the option does
nothing and says so.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

CPU_NOTE = ("train.offload_activations is a no-op on CPU: activations already live in host "
            "memory")
MIN_BYTES = 1 << 16  # smaller saved tensors stay on the device


class HostOffload(torch.autograd.graph.saved_tensors_hooks):
    """Saved tensors of at least `min_bytes` that are not `model`'s parameters (or views of
    them) are kept as host copies (pinned where `pin_memory`) and copied back in backward."""

    def __init__(self, model: nn.Module | None = None, pin_memory: bool = False,
                 min_bytes: int = MIN_BYTES):
        self.weights = set() if model is None else {
            p.untyped_storage().data_ptr() for p in model.parameters()}
        self.pin_memory = pin_memory
        self.min_bytes = min_bytes
        self.copied: list[tuple[int, ...]] = []  # shapes moved to the host (reports, tests)
        super().__init__(self._pack, self._unpack)

    def _keeps(self, t: torch.Tensor) -> bool:
        if isinstance(t, nn.Parameter) or t.layout != torch.strided:
            return True
        if t.numel() * t.element_size() < self.min_bytes:
            return True
        return t.untyped_storage().data_ptr() in self.weights

    def _pack(self, t: torch.Tensor):
        if self._keeps(t):
            return t
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.pin_memory)
        # Pinned memory lets the copy run without blocking the host; the stream orders it
        # before any later kernel can reuse the device tensor's memory.
        host.copy_(t, non_blocking=self.pin_memory)
        self.copied.append(tuple(t.shape))
        return t.device, host

    def _unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        return host.to(device, non_blocking=self.pin_memory)


def activation_offload(enabled: bool, device: torch.device, model: nn.Module | None = None):
    """A context for the forward pass: `HostOffload` on accelerators, else a null context."""
    if enabled and device.type != "cpu":
        return HostOffload(model, pin_memory=device.type == "cuda" and torch.cuda.is_available())
    return contextlib.nullcontext()


def offload_notes(cfg, device: torch.device) -> list[str]:
    """Plain sentences about offload options that cannot act on this device."""
    notes = []
    if cfg.offload_activations and device.type == "cpu":
        notes.append(CPU_NOTE)
    if cfg.offload_optimizer and device.type == "cpu":
        notes.append("train.offload_optimizer is a no-op on CPU: optimizer states already live "
                     "in host memory")
    return notes


def saved_activation_bytes(fn):
    """Run `fn()`; return (bytes of the distinct non-parameter storages autograd keeps for
    backward meanwhile, what `fn` returned): the memory an activation-saving change frees."""
    seen: dict[int, int] = {}

    def pack(t):
        if not isinstance(t, nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out
