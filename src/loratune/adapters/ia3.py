"""(IA)³: a learned scale per channel — on the outputs of key and value projections and on the
input of the MLP's down projection (the activation between the MLP's two halves).

Weighted use (as `set_active({name: w})`) interpolates the scale: l_w = 1 + w·(l − 1), so w = 0
is the base model and w = 1 the trained adapter. Merging multiplies the weight's rows (output
scale, bias too) or columns (input scale) by l_w; unmerging divides them back.
"""

from __future__ import annotations

import torch
from torch import nn

from loratune.adapters.host import LayerAdapter, adapted_layers, leaf_names
from loratune.adapters.peft_format import PeftFolder
from loratune.adapters.registry import (AdapterError, FileSpec, MethodRecord, RowForm,
                                        ServingSpec, register)
from loratune.config import IA3Config
from loratune.models.modules import matches_target


class IA3Adapter(LayerAdapter):
    def __init__(self, in_features: int, out_features: int, config: IA3Config,
                 feedforward: bool, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.feedforward = feedforward
        # PEFT's shapes: [1, in] for a scaled input, [out, 1] for a scaled output.
        shape = (1, in_features) if feedforward else (out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, device=device, dtype=dtype))
        if not config.init_ia3_weights:
            nn.init.normal_(self.ia3_l, mean=1.0, std=0.02)
        self.register_buffer("kept", None, persistent=False)  # rows that train; None: all

    @property
    def r(self) -> int:
        return 0

    def restrict_outputs(self, rows: list[int], parts: list[str]) -> None:
        """Scale only these output rows (Phi-3's k and v rows of qkv_proj); the others stay
        at 1, also in the saved file, so it loads in PEFT as a scale on the whole layer."""
        if self.feedforward:
            raise AdapterError(f"IA³ scales the input of feedforward modules, which the parts "
                               f"{', '.join(parts)} of a fused layer share; it cannot scale one")
        kept = torch.zeros(self.ia3_l.shape, dtype=torch.bool, device=self.ia3_l.device)
        kept[rows] = True
        self.kept = kept
        with torch.no_grad():
            self.ia3_l.masked_fill_(~kept, 1.0)

    def scales(self) -> torch.Tensor:
        """The trained scales, 1 on rows it does not adapt (weight decay cannot move them)."""
        if self.kept is None:
            return self.ia3_l
        return torch.where(self.kept, self.ia3_l, torch.ones_like(self.ia3_l))

    def scale(self, weight: float) -> torch.Tensor:
        return 1 + weight * (self.scales() - 1) if weight != 1.0 else self.scales()

    def scale_input(self, x: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        # The scale (this adapter's output) is cast to x's dtype, not x to fp32: an fp32 copy
        # of the MLP activation would be kept for backward. The fp32 weight still gets every
        # update; only the forward sees it rounded to the base's dtype.
        if not self.feedforward:
            return x
        return x * self.scale(weight).flatten().to(x.dtype)

    def add_to(self, out: torch.Tensor, x: torch.Tensor, weight: float = 1.0,
               base: nn.Module | None = None, base_out: torch.Tensor | None = None
               ) -> torch.Tensor:
        if self.feedforward:
            return out
        return out * self.scale(weight).flatten().to(out.dtype)

    def _factor(self, weight: float, invert: bool) -> torch.Tensor:
        lw = self.scale(weight).detach().float()
        if invert:
            if bool((lw == 0).any()):
                raise ValueError("cannot unmerge an IA³ scale that is exactly 0")
            lw = 1 / lw
        return lw

    def merge_into(self, w: torch.Tensor, bias: torch.Tensor | None, weight: float,
                   invert: bool = False):
        lw = self._factor(weight, invert)
        if self.feedforward:  # x·l then W: scale W's columns; the bias is untouched
            return w * lw.view(1, -1), bias
        return w * lw.view(-1, 1), None if bias is None else bias * lw.view(-1)

    def unmerge_from(self, w: torch.Tensor, bias: torch.Tensor | None, weight: float):
        return self.merge_into(w, bias, weight, invert=True)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {"ia3_l": self.ia3_l}

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        return {"ia3_l": self.scales()}


def new_ia3(config: IA3Config, path: str, in_features: int, out_features: int, *,
            r: int | None = None, alpha: float | None = None, device=None, dtype=None
            ) -> IA3Adapter:
    feedforward = matches_target(path, config.feedforward_modules)
    return IA3Adapter(in_features, out_features, config, feedforward, device=device, dtype=dtype)


def check_feedforward(config: IA3Config, targets: list[str]) -> None:
    """feedforward_modules must name target modules: a scale on no layer is a typo."""
    if isinstance(config.feedforward_modules, list):
        stray = [f for f in config.feedforward_modules
                 if not any(matches_target(p, [f]) for p in targets)]
        if stray:
            raise AdapterError(f"feedforward_modules {stray} are not among the target modules "
                               f"{config.target_modules!r}; they must be a subset")


def ia3_peft_fields(model: nn.Module, name: str, config: IA3Config, compact: bool = True) -> dict:
    feedforward = config.feedforward_modules
    if not isinstance(feedforward, str):
        feedforward = sorted({p.rsplit(".", 1)[-1] for p, l in adapted_layers(model)
                              if name in l.adapters and l.adapters[name].feedforward})
    return {"target_modules": leaf_names(model, name, config.target_modules),
            "feedforward_modules": feedforward, "fan_in_fan_out": False}


def ia3_rows(adapter: PeftFolder, model: nn.Module) -> dict[str, RowForm]:
    """Per layer, the scale on its input (feedforward modules) or on its output."""
    forms = {}
    for path, parts in adapter.modules().items():
        scale = parts.get("ia3_l")
        if scale is None:
            continue
        scale = scale.float().flatten()
        if matches_target(path, adapter.config.feedforward_modules):
            forms[path] = RowForm(in_scale=scale)
        else:
            forms[path] = RowForm(out_scale=scale)
    return forms


register(MethodRecord(
    name="ia3", config_class=IA3Config, peft_type="IA3",
    files=FileSpec(("ia3_l",), peft_fields=ia3_peft_fields), make_layer=new_ia3,
    check_targets=check_feedforward, slices_outputs=True,
    serving=ServingSpec(rows=ia3_rows,
                        why_no_composition="IA³ multiplies channels by its vectors; products of "
                                           "scales are not the sum a composition is")))
