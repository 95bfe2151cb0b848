"""DoRA: weight-decomposed LoRA. W' = m · (W + s·B·A) / ||W + s·B·A||, norms per output row.

The magnitude vector m starts at the rows' norms, so a fresh adapter (B = 0) changes nothing.
As the DoRA paper suggests (§4.3), the norm is treated as a constant in backward, which lets
the update be written on top of the base output instead of rebuilding the weight:
    out = base(x) + (m/n - 1) · (x Wᵀ) + (m/n) · s · B A x,    n = ||W + s·B·A|| (detached)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loratune.adapters.host import LayerAdapter
from loratune.adapters.lora import LoraAdapter, lora_file_fields
from loratune.adapters.lora_product import scaled_factors
from loratune.adapters.peft_format import ANOTHER_BASE, LORA_KINDS, PeftFolder, file_key
from loratune.adapters.registry import (AdapterError, ExportSpec, FileSpec, MethodRecord, RowForm,
                                        ServingSpec, TrainingSpec, register)
from loratune.config import LoraConfig


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The base layer's weight in full precision (4-bit layers dequantize)."""
    return layer.dequantize(torch.float32) if hasattr(layer, "dequantize") else layer.weight


class DoraAdapter(LoraAdapter):
    def __init__(self, in_features: int, out_features: int, config, r=None, alpha=None,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, config, r, alpha, device, dtype)
        self.lora_magnitude_vector = nn.Parameter(torch.ones(out_features, device=device,
                                                             dtype=dtype))

    # DoRA's update needs the base output's norm: the fused LoRA op does not apply.
    fused_forward = LayerAdapter.fused_forward

    def init_from_base(self, base: nn.Module) -> None:
        """m starts at the base rows' norms, so a fresh adapter changes nothing."""
        with torch.no_grad():
            self.lora_magnitude_vector.copy_(self.weight_norm(base_weight(base)))

    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """||W + s·B·A|| per output row, in fp32, without a gradient."""
        with torch.no_grad():
            return torch.linalg.vector_norm(weight.float() + self.delta_weight(), dim=1)

    def add_to(self, out: torch.Tensor, x: torch.Tensor, weight: float = 1.0,
               base: nn.Module | None = None, base_out: torch.Tensor | None = None
               ) -> torch.Tensor:
        w = base_weight(base)
        factor = (self.lora_magnitude_vector / self.weight_norm(w).to(
            self.lora_magnitude_vector.dtype)).to(out.dtype)
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout, training=True)
            plain = F.linear(x.to(out.dtype), w.to(out.dtype))  # base on the dropped input
        else:  # the base layer's own output: `out` may already hold other adapters' updates
            base_out = out if base_out is None else base_out
            plain = base_out if base.bias is None else base_out - base.bias.to(out.dtype)
        lora = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)
        update = (factor - 1) * plain + factor * (lora * self.scaling).to(out.dtype)
        return out + weight * update

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """m · (W + s·B·A) / ||W + s·B·A||, in fp32."""
        full = weight.float() + self.delta_weight()
        norm = torch.linalg.vector_norm(full, dim=1, keepdim=True)
        return full * (self.lora_magnitude_vector.float().view(-1, 1) / norm)

    def merge_into(self, w: torch.Tensor, bias: torch.Tensor | None, weight: float):
        """W + weight·(m·(W+ΔW)/n − W); n is kept to invert the merge exactly later."""
        self._merge_norm = self.weight_norm(w)
        return w + weight * (self.merged_weight(w) - w), bias

    def unmerge_from(self, w: torch.Tensor, bias: torch.Tensor | None, weight: float):
        factor = (self.lora_magnitude_vector.float() / self._merge_norm).view(-1, 1)
        del self._merge_norm
        return (w - weight * factor * self.delta_weight()) / (1 - weight + weight * factor), bias

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().file_tensors(), "lora_magnitude_vector": self.lora_magnitude_vector}


def new_dora(config: LoraConfig, path: str, in_features: int, out_features: int, *,
             r: int | None = None, alpha: float | None = None, device=None, dtype=None
             ) -> DoraAdapter:
    return DoraAdapter(in_features, out_features, config, r, alpha, device, dtype)


MAGNITUDE = "lora_magnitude_vector"


def served_base(model: nn.Module, path: str, adapter: PeftFolder) -> nn.Module:
    """The base layer at `path` of a served model (unwrapping the server's slot layer)."""
    try:
        layer = model.get_submodule(path)
    except AttributeError:
        raise AdapterError(f"{adapter.weights_path}: {file_key(path, MAGNITUDE)} has no place "
                           f"in this model ({ANOTHER_BASE})") from None
    return getattr(layer, "base_layer", layer)


def dora_rows(adapter: PeftFolder, model: nn.Module) -> dict[str, RowForm]:
    """Per layer, the LoRA factors and m/‖W + s·B·A‖ per output row, the norms computed once
    here against the served base: the row's output is m/n·(W·x + s·B·A·x) + bias, as
    merged_weight gives (the bias stays out of the scaling: out_shift = bias·(1 − m/n))."""
    modules = adapter.modules()
    forms = {}
    for path, (a, b) in scaled_factors(adapter).items():
        m = modules[path].get(MAGNITUDE)
        if m is None:
            raise AdapterError(f"{adapter.weights_path}: {file_key(path, MAGNITUDE)} is missing "
                               "(a DoRA adapter has a magnitude vector for every LoRA pair)")
        base = served_base(model, path, adapter)
        w = base_weight(base).float()
        if w.shape != (b.shape[0], a.shape[1]) or m.numel() != w.shape[0]:
            raise AdapterError(f"{adapter.weights_path}: {path} has A {tuple(a.shape)}, B "
                               f"{tuple(b.shape)} and {MAGNITUDE} {tuple(m.shape)}; this model's "
                               f"layer is {tuple(w.shape)} ({ANOTHER_BASE})")
        scale = m.float().flatten() / torch.linalg.vector_norm(w + b @ a, dim=1)
        shift = None if base.bias is None else base.bias.detach().float() * (1 - scale)
        forms[path] = RowForm(a, b, out_scale=scale, out_shift=shift)
    return forms


# PEFT writes DoRA as a LORA adapter with use_dora: true.
register(MethodRecord(
    name="dora", config_class=LoraConfig, peft_type="LORA",
    files=FileSpec((*LORA_KINDS, "lora_magnitude_vector"), peft_fields=lora_file_fields),
    make_layer=new_dora, has_rank=True,
    training=TrainingSpec(plan_note="estimated as LoRA of the same rank: its magnitude vectors "
                                    "and weight-norm work are not counted"),
    # Served per row: the factors plus the magnitude over each row's norm of W + ΔW.
    serving=ServingSpec(rows=dora_rows,
                        why_no_composition="DoRA rescales each output row by its magnitude over "
                                           "the norm of W + B·A, which does not add up across "
                                           "adapters or scale with a weight"),
    export=ExportSpec(why_not="llama.cpp's adapter GGUF holds LoRA factors, and DoRA's per-row "
                              "magnitude is not one")))
