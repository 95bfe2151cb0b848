"""LoRA: a low-rank update ΔW = B·A · scale on a frozen linear layer (hosted by `AdaptedLinear`).

Also the PEFT config fields every low-rank method (DoRA, MoE-LoRA, AdaLoRA) writes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loratune.adapters.base_inits import (add_starting_update, base_init,
                                          config_converts_on_save, converts_on_save, init_hooks,
                                          init_on_load, init_peft_fields, plain_lora_fields,
                                          plain_lora_tensors, start_from_base)
from loratune.adapters.expert_lora import expert_row_blocks, new_expert_lora
from loratune.adapters.fused_lora import fused_lora_forward
from loratune.adapters.host import LayerAdapter, adapted_layers, leaf_names
from loratune.adapters.lora_product import REFERENCE, product, scaled_factors
from loratune.adapters.peft_format import LORA_KINDS, canonical_path, lora_scale
from loratune.adapters.registry import (AdapterError, ExportSpec, FileSpec, MethodRecord,
                                        ServingSpec, TrainingSpec, register)
from loratune.config import AdapterConfig, LoraConfig


def checked_rank(r: int | None, config: AdapterConfig) -> int:
    """`r`, or the config's when None; a rank below 1 is refused (PEFT refuses it too)."""
    r = config.r if r is None else r
    if r < 1:
        raise AdapterError(f"r={r}: the rank must be greater than 0 (adapter.r, or the module's "
                           "rank_pattern entry)")
    return r


class LoraAdapter(LayerAdapter):
    """One adapter's A [r, in] and B [out, r] for one linear layer (PEFT's shapes)."""

    def __init__(self, in_features: int, out_features: int, config: LoraConfig, r: int | None = None,
                 alpha: float | None = None, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.r = checked_rank(r, config)
        self.alpha = config.lora_alpha if alpha is None else alpha
        self.scaling = lora_scale(self.alpha, self.r, config.use_rslora)
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

    def init_from_base(self, base: nn.Module) -> None:
        """PiSSA, OLoRA, LoftQ: A and B from the base weight, which keeps the rest
        (adapters/base_inits.py)."""
        if base_init(self.config.init_lora_weights) is not None:
            start_from_base(self, base)

    def undo_base_change(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return add_starting_update(self, out, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout, training=True)
        return product(x, self.lora_A, self.lora_B, self.scaling)

    def add_to(self, out: torch.Tensor, x: torch.Tensor, weight: float = 1.0,
               base: nn.Module | None = None, base_out: torch.Tensor | None = None
               ) -> torch.Tensor:
        """out + weight·adapter(x): in out's dtype the B matmul, scale and sum are one addmm
        (adapters/lora_product.py)."""
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout, training=True)
        h = REFERENCE.shrink(x, self.lora_A)
        return REFERENCE.expand_add(out, h, self.lora_B, self.scaling * weight)

    def fused_forward(self, base: nn.Module, x: torch.Tensor, weight: float = 1.0
                      ) -> torch.Tensor | None:
        dropout = self.dropout if self.training else 0.0
        return fused_lora_forward(base, x, self.lora_A, self.lora_B, self.scaling * weight,
                                  dropout)

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
        return dict(zip(LORA_KINDS, (self.lora_A, self.lora_B)))

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """After PiSSA/OLoRA the update for the unchanged base (rank 2r), else the live tensors."""
        return plain_lora_tensors(self) if converts_on_save(self) else self.file_tensors()


def new_lora(config: LoraConfig, path: str, in_features: int, out_features: int, *,
             r: int | None = None, alpha: float | None = None, device=None, dtype=None
             ) -> LoraAdapter:
    return LoraAdapter(in_features, out_features, config, r, alpha, device, dtype)


def low_rank_fields(model: nn.Module, name: str, config: AdapterConfig) -> dict:
    """adapter_config.json fields every low-rank method shares (PEFT's LoRA names)."""
    return {"lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
            "target_modules": leaf_names(model, name, config.target_modules),
            "bias": config.bias, "use_rslora": config.use_rslora,
            "init_lora_weights": config.init_lora_weights, "fan_in_fan_out": False,
            "layers_to_transform": None, "layers_pattern": None}


def lora_peft_fields(model: nn.Module, name: str, config: AdapterConfig,
                     compact: bool = True) -> dict:
    """The low-rank fields plus r and the per-module ranks/alphas that differ from it (MoE-LoRA
    writes these; LoRA and DoRA `lora_file_fields`)."""
    layers = [(p, l.adapters[name]) for p, l in adapted_layers(model) if name in l.adapters]
    fields = {**low_rank_fields(model, name, config), "r": config.r, "use_dora": config.use_dora,
              "rank_pattern": {canonical_path(p): a.r for p, a in layers if a.r != config.r},
              "alpha_pattern": {canonical_path(p): a.alpha for p, a in layers
                                if a.alpha != config.lora_alpha}}
    return fields


def lora_file_fields(model: nn.Module, name: str, config: LoraConfig,
                     compact: bool = True) -> dict:
    """LoRA's and DoRA's: those plus what the init writes (loftq_config, eva_config: its
    InitSpec); after PiSSA/OLoRA, those of the plain LoRA the file holds."""
    fields = {**lora_peft_fields(model, name, config, compact),
              **init_peft_fields(model, name, config)}
    if compact and config_converts_on_save(config):
        fields = plain_lora_fields(fields, config.use_rslora)
    return fields


def loaded_options(values: dict) -> dict:
    """The init a file names, as loading keeps it (adapters/base_inits.py `init_on_load`)."""
    return {**values, "init_lora_weights": init_on_load(values.get("init_lora_weights", True))}


register(MethodRecord(
    name="lora", config_class=LoraConfig, peft_type="LORA",
    files=FileSpec(LORA_KINDS, peft_fields=lora_file_fields, loaded_options=loaded_options),
    make_layer=new_lora, make_experts=new_expert_lora, has_rank=True, training=TrainingSpec(hooks=init_hooks, plan_note=None),
    serving=ServingSpec(factors=scaled_factors, experts=expert_row_blocks),
    export=ExportSpec(gguf_factors=scaled_factors)))
