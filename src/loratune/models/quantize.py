"""Turn a loaded model's linear layers into 4-bit ones and prepare it for k-bit training."""

from __future__ import annotations

import torch
from torch import nn

from loratune.config import QuantConfig
from loratune.models.device import DTYPES
from loratune.models.modules import output_layer_names, set_submodule
from loratune.models.moe_experts import QuantizedExperts, is_fused_experts, quantize_experts
from loratune.quant.linear4bit import Linear4bit


def quantize_model(model: nn.Module, cfg: QuantConfig, names: list[str] | None = None) -> list[str]:
    """Replace linear layers by frozen Linear4bit ones; returns the paths replaced.

    `names=None` takes every nn.Linear except the output layer, and every mixture-of-experts
    layer's fused routed experts (one 4-bit matrix per expert: `quantize_model_experts`). Any
    in/out size works: blocks run over the flattened weight, and a short last block gets its
    own scale.
    """
    if names is None:
        skip = output_layer_names(model)
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in skip]
        names += quantize_model_experts(model, cfg)
    modules = dict(model.named_modules())
    for name in names:
        module = modules.get(name)
        if isinstance(module, QuantizedExperts):
            continue
        if not isinstance(module, nn.Linear):
            kind = "no such module" if module is None else type(module).__name__
            raise ValueError(f"cannot quantize '{name}' to 4 bits: only nn.Linear layers can "
                             f"be, it is {kind}")
    for name in (n for n in names if not isinstance(modules[n], QuantizedExperts)):
        set_submodule(model, name, Linear4bit.from_linear(
            modules[name], cfg.blocksize, cfg.type, cfg.double_quant, DTYPES[cfg.compute_dtype],
            cfg.kernel))
    return list(names)


def quantize_model_experts(model: nn.Module, cfg: QuantConfig) -> list[str]:
    """Replace each fused experts module (3-D gate_up_proj/down_proj) by QuantizedExperts;
    the router and the shared experts (plain linears) are not part of it."""
    names = [n for n, m in model.named_modules() if is_fused_experts(m)]
    for name in names:
        set_submodule(model, name, quantize_experts(
            model.get_submodule(name), cfg.blocksize, cfg.type, cfg.double_quant,
            DTYPES[cfg.compute_dtype], cfg.kernel))
    return names


def unquantized_dtype(cfg: QuantConfig) -> torch.dtype:
    """The dtype of what stays unquantized (embeddings, lm_head, norms, biases)."""
    return torch.float32 if cfg.unquantized_dtype == "float32" else DTYPES[cfg.compute_dtype]


def prepare_for_kbit_training(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Freeze the model and store what is not quantized (norms, embeddings, lm_head, biases)
    in `dtype` (`unquantized_dtype(cfg)`).

    In the compute dtype the whole model runs in it (the 8B shape's embeddings and lm_head
    alone are 4.2 GB in fp32, 2.1 GB in bf16); fp32 is PEFT's choice (its
    prepare_model_for_kbit_training), which keeps the residual stream in fp32.
    """
    for param in model.parameters():
        param.requires_grad_(False)
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    return model


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of every 4-bit matrix (QuantizedExperts hold theirs as Linear4bit modules)."""
    return sum(m.quantized().nbytes() for m in model.modules() if isinstance(m, Linear4bit))
