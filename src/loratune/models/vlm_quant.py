"""QLoRA for a vision-language model: only the language model's linear layers go to 4 bits.

The vision tower and projector stay in the compute dtype: they are a small share of the
weights, and their activations (patch embeddings) are what every image token is built from.
"""

from __future__ import annotations

from torch import nn

from loratune.config import QuantConfig
from loratune.models.modules import set_submodule
from loratune.models.quantize import prepare_for_kbit_training, quantize_model, unquantized_dtype
from loratune.models.vision import vision_family
from loratune.quant.linear4bit import Linear4bit


def language_linears(model: nn.Module) -> list[str]:
    """The nn.Linear layers inside the family's language model (lm_head is outside it)."""
    prefix = vision_family(model.config).language + "."
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.startswith(prefix)]


def quantize_language_model(model: nn.Module, cfg: QuantConfig) -> list[str]:
    """Language-model linears to Linear4bit, everything else frozen in the unquantized dtype
    (the compute dtype unless quantization.unquantized_dtype says float32)."""
    names = quantize_model(model, cfg, language_linears(model))
    prepare_for_kbit_training(model, unquantized_dtype(cfg))
    return names


def dequantize_linears(model: nn.Module) -> nn.Module:
    """Each Linear4bit (wrapped by an adapter or not) back to an nn.Linear holding the values
    it computed with: the base a QLoRA adapter merges into, as `loratune merge --qlora` does."""
    for path, layer in [(p, m) for p, m in model.named_modules() if isinstance(m, Linear4bit)]:
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                          device=layer.packed.device, dtype=layer.compute_dtype)
        plain.weight.data = layer.dequantize(layer.compute_dtype)
        if layer.bias is not None:
            plain.bias.data = layer.bias.data.to(layer.compute_dtype)
        plain.requires_grad_(False)
        set_submodule(model, path, plain)
    return model
