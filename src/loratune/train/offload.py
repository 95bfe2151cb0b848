"""Move tensors saved for backward to host memory while the forward pass runs on a GPU.

With gradient checkpointing only each decoder layer's input is kept; offloading those too
leaves GPU memory for one layer's recomputation. On a CPU-only run the activations already
live in host memory, so the option does nothing and says so.
"""

from __future__ import annotations

import contextlib

import torch

CPU_NOTE = ("train.offload_activations is a no-op on CPU: activations already live in host "
            "memory")


def activation_offload(enabled: bool, device: torch.device):
    """A context for the forward pass: `save_on_cpu` on accelerators, else a null context."""
    if enabled and device.type != "cpu":
        return torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")
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
