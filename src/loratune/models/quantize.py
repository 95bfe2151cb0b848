"""Turn a loaded model's linear layers into 4-bit ones and prepare it for k-bit training."""

from __future__ import annotations

import torch
from torch import nn

from loratune.config import QuantConfig
from loratune.models.device import DTYPES
from loratune.models.modules import output_layer_names, set_submodule
from loratune.quant.linear4bit import Linear4bit



def quantize_model(model: nn.Module, cfg: QuantConfig, names: list[str] | None = None) -> list[str]:
    """Replace linear layers by frozen Linear4bit ones; returns the paths replaced.

    `names=None` takes every nn.Linear except the output layer. Any in/out size works: blocks
    run over the flattened weight, and a short last block gets its own scale.
    """
    if names is None:
        skip = output_layer_names(model)
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in skip]
    modules = dict(model.named_modules())
    for name in names:
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            kind = "no such module" if module is None else type(module).__name__
            raise ValueError(f"cannot quantize '{name}' to 4 bits: only nn.Linear layers can "
                             f"be, it is {kind}")
    for name in names:
        set_submodule(model, name, Linear4bit.from_linear(
            modules[name], cfg.blocksize, cfg.type, cfg.double_quant, DTYPES[cfg.compute_dtype]))
    return list(names)


def prepare_for_kbit_training(model: nn.Module) -> nn.Module:
    """Keep what is not quantized (norms, embeddings, lm_head) frozen and in fp32.

    Low-precision norms and output logits are where k-bit fine-tuning loses accuracy; they
    are small, so fp32 costs little memory.
    """
    for param in model.parameters():
        param.requires_grad_(False)
        if param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()
    return model


def quantized_bytes(model: nn.Module) -> int:
    return sum(m.quantized().nbytes() for m in model.modules() if isinstance(m, Linear4bit))
