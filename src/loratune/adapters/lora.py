"""LoRA: a frozen linear layer plus named low-rank updates ΔW = B·A · scale.

`AdaptedLinear` owns the frozen base layer and any number of named `LoraAdapter`s; which of
them run (and with what weight) is plain state on the layer, set by `loratune.adapters.inject`.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from loratune.config import LoraConfig


class LoraAdapter(nn.Module):
    """One adapter's A [r, in] and B [out, r] for one linear layer (PEFT's shapes)."""

    def __init__(self, in_features: int, out_features: int, config: LoraConfig, r: int | None = None,
                 alpha: float | None = None, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.r = r or config.r
        self.alpha = config.lora_alpha if alpha is None else alpha
        self.scaling = self.alpha / (math.sqrt(self.r) if config.use_rslora else self.r)
        self.dropout = config.lora_dropout
        kw = {"device": device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.empty(self.r, in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(out_features, self.r, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.config.init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
        else:
            # Same init as nn.Linear's weight, so A starts like a freshly made projection.
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout, training=True)
        x = x.to(self.lora_A.dtype)
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    def add_to(self, out: torch.Tensor, x: torch.Tensor, weight: float = 1.0,
               base: nn.Module | None = None, base_out: torch.Tensor | None = None
               ) -> torch.Tensor:
        """out + weight·adapter(x), with the B matmul, scale and sum fused into one addmm."""
        if out.dtype != self.lora_B.dtype:
            return out + (weight * self(x)).to(out.dtype)
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout, training=True)
        h = F.linear(x.to(self.lora_A.dtype), self.lora_A)
        # Scaling the [tokens, out] result would cost a full-size multiply (and another in
        # backward); addmm applies it inside the matmul.
        fused = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, self.r), self.lora_B.t(),
                            alpha=self.scaling * weight)
        return fused.view(out.shape)

    def delta_weight(self) -> torch.Tensor:
        """B·A·scale in fp32 (low-precision products lose the small update)."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def merge_into(self, w: torch.Tensor, bias: torch.Tensor | None, weight: float):
        """(W, b) in fp32 with weight·ΔW folded in."""
        return w + weight * self.delta_weight(), bias

    def unmerge_from(self, w: torch.Tensor, bias: torch.Tensor | None, weight: float):
        return w - weight * self.delta_weight(), bias

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """Live tensors by the key suffix PEFT's files use."""
        return {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B}


class AdaptedLinear(nn.Module):
    """A frozen linear layer plus named adapters of the layer-level methods.

    forward = base(x') then each active adapter's `add_to`, where x' is x after the input scales
    of adapters that have `scale_input` (IA³ on feed-forward layers).
    """

    hosts_adapters = True

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active: dict[str, float] = {}
        self.merged: dict[str, float] = {}
        self.disabled = False

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def unwrap(self) -> nn.Module:
        return self.base_layer

    def file_tensors(self, name: str, path: str) -> dict[str, torch.Tensor]:
        return {f"base_model.model.{path}.{k}": t
                for k, t in self.adapters[name].file_tensors().items()}

    def saved_tensors(self, name: str, path: str) -> dict[str, torch.Tensor]:
        """What an adapter file holds (AdaLoRA: only its kept ranks, as PEFT writes them)."""
        ad = self.adapters[name]
        tensors = ad.saved_tensors() if hasattr(ad, "saved_tensors") else ad.file_tensors()
        return {f"base_model.model.{path}.{k}": t for k, t in tensors.items()}

    def _running(self) -> list[tuple[nn.Module, float]]:
        if self.disabled:
            return []
        return [(self.adapters[n], w) for n, w in self.active.items() if n not in self.merged]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        running = self._running()
        x_base = x
        for ad, weight in running:
            if hasattr(ad, "scale_input"):
                x_base = ad.scale_input(x_base, weight)
        out = base_out = self.base_layer(x_base)
        for ad, weight in running:
            out = ad.add_to(out, x, weight, self.base_layer, base_out)
        return out

    def _rewrite_weight(self, name: str, weight: float, undo: bool) -> None:
        if not isinstance(self.base_layer, nn.Linear):
            # Re-rounding a 4-bit weight would change the base; merge into a dequantized copy.
            raise ValueError(f"cannot merge into a {type(self.base_layer).__name__} base in "
                             "place; dequantize the base model first (load it unquantized)")
        ad, layer = self.adapters[name], self.base_layer
        bias = None if layer.bias is None else layer.bias.float()
        step = ad.unmerge_from if undo else ad.merge_into
        with torch.no_grad():
            w, b = step(layer.weight.float(), bias, weight)
            layer.weight.copy_(w.to(layer.weight.dtype))
            if b is not None:
                layer.bias.copy_(b.to(layer.bias.dtype))

    def merge(self, names: dict[str, float] | None = None) -> None:
        for name, weight in (self.active if names is None else names).items():
            if name in self.adapters and name not in self.merged:
                self._rewrite_weight(name, weight, undo=False)
                self.merged[name] = weight

    def unmerge(self) -> None:
        for name, weight in reversed(list(self.merged.items())):
            self._rewrite_weight(name, weight, undo=True)
            del self.merged[name]

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}, active={self.active}, merged={list(self.merged)}"


class SavedModule(nn.Module):
    """`modules_to_save`: a trainable copy of a whole module per adapter, original kept frozen."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original = original
        self.copies = nn.ModuleDict()
        self.active: dict[str, float] = {}
        self.disabled = False

    def add_copy(self, name: str) -> nn.Module:
        clone = copy.deepcopy(self.original)
        clone.requires_grad_(True)
        self.copies[name] = clone
        return clone

    def current(self) -> nn.Module:
        if not self.disabled:
            for name in self.active:
                if name in self.copies:
                    return self.copies[name]
        return self.original

    def forward(self, *args, **kwargs):
        return self.current()(*args, **kwargs)

    def __getattr__(self, item):
        # Model code reads attributes such as `lm_head.weight`; answer for the module in use.
        try:
            return super().__getattr__(item)
        except AttributeError:
            return getattr(self.current(), item)
