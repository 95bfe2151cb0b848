"""Attention over packed rows (`model.packed_attention`) without a dense block mask.

Packed rows carry `position_ids` that restart at 0 for each example (data/packing.py).
transformers reads the segments from them under every attention backend: sdpa and eager get a
dense [rows, 1, tokens, tokens] block-diagonal mask (`mask`); `flex_attention` gets a block mask
of the same documents that skips the blocks across them (`flex`); `flash_attention_2` runs
FlashAttention's variable-length kernel over cumulative sequence lengths from the same
position_ids (`varlen`). This module only picks the backend, by public API
(`set_attn_implementation`); it never patches the model's code.

On CPU both fast paths step aside with a note: torch 2.13's flex_attention runs forward on CPU
but has no backward there, and FlashAttention is CUDA-only.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

CHOICES = ("mask", "flex", "varlen", "auto")
BACKENDS = {"flex": "flex_attention", "varlen": "flash_attention_2"}


class AttentionError(ValueError):
    """A packed-attention choice that cannot run here; the message names the key."""


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def packed_backend(choice: str, device: torch.device, packing: bool,
                   flash: bool | None = None) -> tuple[str | None, str | None]:
    """(attention backend to set, or None to keep the model's; a note for the log, or None)."""
    if choice not in CHOICES:
        raise AttentionError(f"model.packed_attention '{choice}': expected one of "
                             f"{', '.join(CHOICES)}")
    if choice == "mask" or not packing:
        return None, None
    flash = flash_attn_installed() if flash is None else flash
    if device.type != "cuda":
        if choice == "auto":
            return None, None
        why = ("flex_attention has no backward on CPU in torch 2.13" if choice == "flex" else
               "FlashAttention runs on CUDA only")
        return None, (f"model.packed_attention: {choice} falls back to the dense block mask "
                      f"on {device.type} ({why})")
    if choice == "varlen" and not flash:
        raise AttentionError("model.packed_attention: varlen needs the flash-attn package "
                             "(pip install flash-attn); flex needs nothing more")
    if choice == "auto":
        choice = "varlen" if flash else "flex"
    return BACKENDS[choice], f"packed rows attend through {BACKENDS[choice]} (no dense mask)"


def use_packed_attention(model: nn.Module, choice: str, device: torch.device,
                         packing: bool) -> str | None:
    """Set the model's attention backend for packed rows; returns the note to log, if any."""
    backend, note = packed_backend(choice, device, packing)
    if backend is not None:
        model.set_attn_implementation(backend)
    return note
