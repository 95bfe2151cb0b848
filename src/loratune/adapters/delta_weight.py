"""Adapters that rebuild their whole update ΔW [out, in] from small factors (LoHa, LoKr).

A Hadamard product has no cheap path through x, so (as PEFT does) LoHa builds ΔW in each
forward and applies it: an extra out×in matmul per layer, and ΔW is kept for backward. LoKr
applies its Kronecker product to x factor by factor instead (lokr.py). The scale is alpha / r.
PEFT's two training-time regularisers are kept: `module_dropout` skips a layer's update for a
step, `rank_dropout` zeroes random output rows of ΔW (LoHa rescales the kept rows by
1/(fraction kept); LoKr only with `rank_dropout_scale`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loratune.adapters.host import LayerAdapter, adapted_layers, leaf_names
from loratune.adapters.lora import checked_rank
from loratune.adapters.peft_format import canonical_path, pattern_value
from loratune.config import AdapterConfig


def he_uniform(*shape: int, device=None) -> torch.Tensor:
    """A factor initialised as nn.Linear initialises its weight."""
    return nn.init.kaiming_uniform_(torch.empty(shape, device=device), a=math.sqrt(5))


class DeltaWeightAdapter(LayerAdapter):
    """The shared half: scale, dropouts, merge and the file's rank; a subclass makes its
    factors (`make_factors`) and multiplies them out (`unscaled_delta`)."""

    rescale_rank_dropout = True

    def __init__(self, in_features: int, out_features: int, config, r: int | None = None,
                 alpha: float | None = None, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.in_features, self.out_features = in_features, out_features
        self.alpha = config.alpha if alpha is None else alpha
        self.set_rank(checked_rank(r, config), device, dtype)

    def set_rank(self, r: int, device=None, dtype=None) -> None:
        """(Re)make the factors for rank r, initialised as the config says."""
        self.r = r
        self.scaling = self.alpha / r
        for name in getattr(self, "factor_names", ()):
            delattr(self, name)
        factors = self.make_factors(r, device)
        self.factor_names = tuple(factors)
        for name, value in factors.items():
            self.register_parameter(name, nn.Parameter(value.to(device=device, dtype=dtype)))

    def make_factors(self, r: int, device) -> dict[str, torch.Tensor]:
        """File kind -> initialised fp32 factor on `device`, for rank r."""
        raise NotImplementedError

    def unscaled_delta(self) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """ΔW [out, in] in the adapter's dtype, scaled, without dropout."""
        return self.unscaled_delta() * self.scaling

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """ΔW·x for input x, without dropout; a method with a cheaper path than building ΔW
        (LoKr) overrides it."""
        delta = self.delta_weight()
        return F.linear(x.to(delta.dtype), delta)

    def kept_rows(self, y: torch.Tensor) -> torch.Tensor:
        """A factor per output feature of update `y`: 0 with probability rank_dropout (PEFT
        drops rows of ΔW, which is the same), the kept ones rescaled when the method does."""
        n = y.shape[-1]
        keep = (torch.rand(n, device=y.device) >= self.config.rank_dropout).to(y.dtype)
        if self.rescale_rank_dropout:  # all rows dropped: the update is 0 whatever the divisor
            keep = keep / keep.mean().clamp_min(1.0 / n)
        return keep

    def add_to(self, out: torch.Tensor, x: torch.Tensor, weight: float = 1.0,
               base: nn.Module | None = None, base_out: torch.Tensor | None = None
               ) -> torch.Tensor:
        if self.training and self.config.module_dropout:
            if torch.rand(()).item() < self.config.module_dropout:
                return out
        y = self.update(x)
        if self.training and self.config.rank_dropout:
            y = y * self.kept_rows(y)
        return out + (weight * y).to(out.dtype)

    def merge_into(self, w: torch.Tensor, bias: torch.Tensor | None, weight: float):
        return w + weight * self.delta_weight().float(), bias

    def unmerge_from(self, w: torch.Tensor, bias: torch.Tensor | None, weight: float):
        return w - weight * self.delta_weight().float(), bias

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.factor_names}

    def fit_file(self, path: str, tensors: dict[str, torch.Tensor], raw: dict) -> None:
        """Take the module's rank from the file's rank_pattern (a merge builds the adapter from
        the config's r; a Kronecker factor's shape may not show the rank, its scale needs it)."""
        r = int(pattern_value(path, raw.get("rank_pattern") or {}, self.config.r))
        if r != self.r:
            first = next(iter(self.file_tensors().values()))
            self.set_rank(checked_rank(r, self.config), first.device, first.dtype)


def factored_peft_fields(model: nn.Module, name: str, config: AdapterConfig,
                         compact: bool = True) -> dict:
    """adapter_config.json fields beside the options: target_modules as leaf names, and the
    per-module ranks/alphas that differ from r/alpha."""
    layers = [(p, l.adapters[name]) for p, l in adapted_layers(model) if name in l.adapters]
    return {"target_modules": leaf_names(model, name, config.target_modules),
            "rank_pattern": {canonical_path(p): a.r for p, a in layers if a.r != config.r},
            "alpha_pattern": {canonical_path(p): a.alpha for p, a in layers
                              if a.alpha != config.alpha},
            "layers_to_transform": None, "layers_pattern": None}
