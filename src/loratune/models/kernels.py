"""Fused RMSNorm and SwiGLU kernels from liger-kernel (`model.fused_kernels`, CUDA only).

The model's norm and MLP modules of the Llama family are swapped for modules holding the same
weights and children (so state-dict keys, adapter paths and files do not change) whose forward
calls liger-kernel's Triton functions: RMSNorm in one kernel that keeps one fp32 rstd per row
for backward; SiLU(gate)·up in one kernel that recomputes the SiLU in backward. Other
architectures' norms and MLPs (Gemma's 1+w norm, GELU MLPs) stay as they are, named in a note.

Left out on purpose: RoPE (transformers applies it inside the attention code; fusing it would
mean patching that code) and liger's fused linear cross-entropy: loratune's loss
(train/loss.py) already projects only labelled positions, in chunks recomputed in backward, so
the full [tokens, vocab] logits never exist. On CPU (liger's kernels are Triton GPU kernels and
do not run under Triton's interpreter) the plain path runs and says so.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
from torch import nn

from loratune.models.modules import set_submodule

# y = w · x / sqrt(mean(x²) + eps), variance in fp32, the product in the input dtype (Llama's)
LLAMA_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}
# down(silu(gate(x)) · up(x))
SWIGLU_MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"}
EXTRA = "pip install 'loratune[liger]' (the liger-kernel package)"


class KernelError(ValueError):
    """model.fused_kernels cannot run as asked; the message names the key and the fix."""


def liger_functions() -> tuple[Callable, Callable]:
    """(rms_norm(x, w, eps), silu_mul(gate, up)) from liger-kernel."""
    from liger_kernel.transformers.functional import liger_rms_norm, liger_swiglu

    def rms_norm(x, weight, eps):
        # in_place=False: the incoming gradient may be read by other consumers of it.
        return liger_rms_norm(x, weight, eps, offset=0.0, casting_mode="llama", in_place=False)

    return rms_norm, liger_swiglu


class FusedRMSNorm(nn.Module):
    """A Llama-style RMSNorm over the original's weight, computed by `rms_norm`."""

    def __init__(self, norm: nn.Module, rms_norm: Callable):
        super().__init__()
        self.weight = norm.weight
        self.variance_epsilon = norm.variance_epsilon
        self.rms_norm = rms_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rms_norm(x, self.weight, self.variance_epsilon)


class FusedSwiGLU(nn.Module):
    """The original MLP's gate/up/down projections (adapters included), SiLU·up by `silu_mul`."""

    def __init__(self, mlp: nn.Module, silu_mul: Callable):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.silu_mul = silu_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.silu_mul(self.gate_proj(x), self.up_proj(x)))


def swap_fused_modules(model: nn.Module, rms_norm: Callable, silu_mul: Callable) -> dict:
    """Replace Llama-style norms and SwiGLU MLPs; returns {'swapped': n, 'left': {class: n}}."""
    swapped, left = 0, {}
    for path, mod in list(model.named_modules()):
        name = type(mod).__name__
        if name in LLAMA_NORMS and hasattr(mod, "variance_epsilon"):
            set_submodule(model, path, FusedRMSNorm(mod, rms_norm))
            swapped += 1
        elif name in SWIGLU_MLPS and type(getattr(mod, "act_fn", None)).__name__ in (
                "SiLU", "SiLUActivation"):
            set_submodule(model, path, FusedSwiGLU(mod, silu_mul))
            swapped += 1
        elif name.endswith("RMSNorm") or name.endswith("MLP"):
            left[name] = left.get(name, 0) + 1
    return {"swapped": swapped, "left": left}


def use_fused_kernels(model: nn.Module, device: torch.device) -> list[str]:
    """`model.fused_kernels: true`: swap in liger-kernel's RMSNorm and SwiGLU on CUDA; notes."""
    if device.type != "cuda":
        return [f"model.fused_kernels: liger-kernel's kernels need CUDA; the plain PyTorch "
                f"RMSNorm/SwiGLU run on {device.type}"]
    if importlib.util.find_spec("liger_kernel") is None:
        raise KernelError(f"model.fused_kernels: true needs liger-kernel on CUDA: {EXTRA}")
    done = swap_fused_modules(model, *liger_functions())
    notes = [f"model.fused_kernels: {done['swapped']} norms and MLPs run liger-kernel's fused "
             "RMSNorm/SwiGLU; RoPE and the loss stay loratune's own"]
    if done["left"]:
        notes.append("model.fused_kernels: left as they are (not Llama-style): " +
                     ", ".join(f"{k} x{v}" for k, v in done["left"].items()))
    return notes
