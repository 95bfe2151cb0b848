"""Turn a loaded model's linear layers into 4-bit ones and prepare it for k-bit training."""

from __future__ import annotations

import torch
from torch import nn

from loratune.config import QuantConfig
from loratune.models.modules import output_layer_names, set_submodule
from loratune.quant.linear4bit import Linear4bit

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def quantize_model(model: nn.Module, cfg: QuantConfig) -> list[str]:
    """Replace every nn.Linear except the output layer by a frozen Linear4bit; returns paths."""
    skip = output_layer_names(model)
    done = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name not in skip:
            set_submodule(model, name, Linear4bit.from_linear(
                module, cfg.blocksize, cfg.type, cfg.double_quant, DTYPES[cfg.compute_dtype]))
            done.append(name)
    return done


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
