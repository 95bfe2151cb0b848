"""The LoRA product, x·Aᵀ·(s·B)ᵀ, written once: its math, and the backends that run it.

Every place that multiplies by LoRA factors comes here: training's adapter (adapters/lora.py),
its fused autograd op (fused_lora.py), the server's slot-stacked layer (serve/multi_lora.py),
and the two places that fold the scale s into B (serving's slots, llama.cpp's adapter file),
which call `scaled_factors`.

The product runs in two halves, named as Punica's SGMV kernels name them: `shrink` (x·Aᵀ, in
to rank) and `expand_add` (out + s·h·Bᵀ, rank to out, added in place of a separate sum). A
backend implements both for one adapter, and the three slot-stacked forms the server needs for a
batch whose rows use different adapters. `TorchBackend` is the reference: PyTorch ops whose
results every other backend is tested against (tests/adapters/test_lora_product.py runs every
registered backend). A Triton or CUDA kernel registers itself with `register_backend`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loratune.adapters.peft_format import LORA_KINDS, PeftFolder, file_key
from loratune.adapters.registry import AdapterError


class TorchBackend:
    """The reference backend: plain PyTorch matmuls, one addmm where an output can take it."""

    name = "torch"

    def shrink(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """h = x·Aᵀ [..., r], x cast to A's dtype (an fp32 adapter on a bf16 base)."""
        return F.linear(x.to(a.dtype), a)

    def expand_add(self, out: torch.Tensor, h: torch.Tensor, b: torch.Tensor,
                   scale: float) -> torch.Tensor:
        """out + s·h·Bᵀ, a new tensor (autograd keeps `out`). In out's dtype: one addmm with the
        scale as its alpha (scaling the [tokens, out] result would cost a full-size multiply,
        and another in backward); otherwise computed in B's dtype and cast."""
        if out.dtype != b.dtype:
            return out + (F.linear(h, b) * scale).to(out.dtype)
        fused = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), b.t(),
                            alpha=scale)
        return fused.view(out.shape)

    # -- slot-stacked: the server's B is stored as s·B, so no scale below -------------------------
    def one_slot(self, out: torch.Tensor, x: torch.Tensor, a: torch.Tensor,
                 b: torch.Tensor) -> torch.Tensor:
        """Every row on one adapter, A [r, in], B [out, r]: added into `out` in place."""
        h = x.to(a.dtype) @ a.t()
        if out.dtype != h.dtype:
            return out + (h @ b.t()).to(out.dtype)
        # Fused into the base output: no [tokens, out] temporary for the update.
        flat = out.view(-1, out.shape[-1])
        return flat.addmm_(h.reshape(-1, h.shape[-1]), b.t()).view_as(out)

    def all_slots(self, out: torch.Tensor, x: torch.Tensor, a_all: torch.Tensor,
                  b_all: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
        """x [batch, 1, in] against every slot at once: Aᵀ [in, S·r], Bᵀ [S·r, out]; `others`
        [batch, S·r] marks the columns of slots a row does not use (zeroed: exact zeros added)."""
        h = torch.mm(x.reshape(x.shape[0], -1).to(a_all.dtype), a_all)  # [batch, S·r]
        h.masked_fill_(others, 0)
        if out.dtype != h.dtype:
            return out + torch.mm(h, b_all).to(out.dtype).view_as(out)
        out.view(x.shape[0], -1).addmm_(h, b_all)
        return out

    def gathered(self, out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                 rows: torch.Tensor) -> torch.Tensor:
        """Each row's own slot: A [S, r, in] and B [out, S, r] gathered by `rows` [batch], then
        two batched matmuls (the BGMV idea of Punica / S-LoRA)."""
        a_rows = a.index_select(0, rows)                           # [batch, r, in]
        b_rows = b.index_select(1, rows).permute(1, 2, 0)          # [batch, r, out]
        h = torch.bmm(x.to(a_rows.dtype), a_rows.transpose(1, 2))  # [batch, tokens, r]
        if out.dtype != h.dtype:
            return out + torch.bmm(h, b_rows).to(out.dtype)
        return out.baddbmm_(h, b_rows)


_BACKENDS: dict[str, TorchBackend] = {"torch": TorchBackend()}


def register_backend(backend) -> None:
    """Make `backend` (TorchBackend's methods, same results) selectable by its `name`."""
    _BACKENDS[backend.name] = backend


def backend_names() -> list[str]:
    return list(_BACKENDS)


def backend(name: str = "torch"):
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"LoRA backend {name!r} is not registered; choose from "
                         f"{', '.join(_BACKENDS)}") from None


REFERENCE = _BACKENDS["torch"]


def product(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """The update alone, s·x·Aᵀ·Bᵀ in the factors' dtype."""
    return F.linear(REFERENCE.shrink(x, a), b) * scale


def scaled_factors(adapter: PeftFolder) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module path of a LoRA folder, A [r, in] and s·B [out, r] in float32: the one place
    the scale (alpha over the module's rank, rsLoRA's root, the patterns) is folded into B."""
    out = {}
    for path, (a, b) in adapter.lora_pairs().items():
        if b is None:
            raise AdapterError(f"{adapter.weights_path}: {file_key(path, LORA_KINDS[0])} has "
                               "no matching lora_B tensor")
        out[path] = (a.float(), b.float() * adapter.scale(path, a.shape[0]))
    return out
