"""Fused LoRA projection: base(x) + s·B·A·dropout(x) as one autograd op (`train.fused_lora`).

Autograd on the plain path keeps, per projection, the dropped-out copy of x (with dropout), the
fp32 copy of x (fp32 adapters on a bf16 base: q, k and v each cast the same input) and the
adapter's intermediate results. This op keeps only x itself (shared by every projection that
reads it), the dropout mask as booleans and h = A·dropout(x) [tokens, r], and forms dA, dB and
dx in four matmuls plus the base's input gradient. A frozen 4-bit base is dequantized in
backward instead of being kept (as `Linear4bit` does on its own). The numerics follow the plain
path: the adapter computes in its own dtype and is cast to the base's output dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from loratune.adapters.lora_product import REFERENCE


def frozen_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor | None:
    """The frozen base weight [out, in] for the input gradient; None: no fused path for it."""
    if hasattr(base, "dequantize") and hasattr(base, "packed"):  # 4-bit: rebuilt when needed
        return base.dequantize(dtype)
    weight = getattr(base, "weight", None)
    if isinstance(base, nn.Linear) and weight is not None and not weight.requires_grad:
        return weight
    return None


def can_fuse(base: nn.Module) -> bool:
    """Whether `base` is a frozen linear layer the fused op can stand in for."""
    if hasattr(base, "dequantize") and hasattr(base, "packed"):
        return base.bias is None or not base.bias.requires_grad
    return (isinstance(base, nn.Linear) and not base.weight.requires_grad
            and (base.bias is None or not base.bias.requires_grad))


class FusedLoraLinear(torch.autograd.Function):
    """out = base(x) + scale·(dropout(x)·Aᵀ)·Bᵀ, saving x, the mask and h = dropout(x)·Aᵀ."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                base: nn.Module, scale: float, dropout: float) -> torch.Tensor:
        out = base(x)
        x2 = x.reshape(-1, x.shape[-1])
        noise = None
        if dropout:
            # Drawn as F.dropout draws on CPU (same generator calls), kept as booleans.
            noise = torch.empty_like(x2).bernoulli_(1 - dropout).div_(1 - dropout)
            xd = x2 * noise
        else:
            xd = x2
        h = REFERENCE.shrink(xd, lora_A)
        out2 = REFERENCE.expand_add(out.reshape(-1, out.shape[-1]), h, lora_B, scale)
        keep = noise.ne(0) if noise is not None else None
        ctx.save_for_backward(x, h, lora_A, lora_B, *(() if keep is None else (keep,)))
        ctx.base, ctx.scale, ctx.dropout = base, scale, dropout
        return out2.view(*x.shape[:-1], out2.shape[-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, h, lora_A, lora_B, *keep = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        ga = g.to(lora_B.dtype)  # the adapter's share of the gradient, in its dtype
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        noise = None
        if keep:
            noise = keep[0].to(x.dtype).div_(1 - ctx.dropout)
        dA = dB = dx = None
        # gh = s·g·B: the gradient at h, shared by dA and dx.
        gh = (ga @ lora_B).mul_(ctx.scale) if (need_a or need_x) else None
        if need_b:
            dB = (ga.t() @ h).mul_(ctx.scale)
        if need_a:
            x2 = x.reshape(-1, x.shape[-1])
            xd = x2 * noise if noise is not None else x2
            dA = gh.t() @ xd.to(lora_A.dtype)
        if need_x:
            # The base's own compute dtype (a 4-bit layer's compute_dtype), as its backward uses.
            dtype = getattr(ctx.base, "compute_dtype", g.dtype)
            dx = g.to(dtype) @ frozen_weight(ctx.base, dtype).to(dtype)
            adapter_dx = (gh @ lora_A).to(x.dtype)
            if noise is not None:
                adapter_dx = adapter_dx * noise
            dx = (dx.to(x.dtype) + adapter_dx).view(x.shape)
        return dx, dA, dB, None, None, None


def fused_lora_forward(base: nn.Module, x: torch.Tensor, lora_A: torch.Tensor,
                       lora_B: torch.Tensor, scale: float, dropout: float) -> torch.Tensor | None:
    """The fused projection's output, or None where it does not apply (a trained base, an
    unsupported layer type): the caller then takes the plain path."""
    if not can_fuse(base):
        return None
    return FusedLoraLinear.apply(x, lora_A, lora_B, base, scale, dropout)


def set_fused_lora(model: nn.Module, on: bool) -> int:
    """Switch the fused path on/off on every adapted linear layer; returns how many."""
    from loratune.adapters.host import adapted_layers

    n = 0
    for _, layer in adapted_layers(model):
        layer.fused = on
        n += 1
    return n
