"""How far a merged folder is from the base model with its adapters applied live."""

from __future__ import annotations

from pathlib import Path

import torch

SAMPLE = "Fine-tuning adapts a pretrained language model to a task with few trainable weights."


@torch.no_grad()
def merged_logit_gap(model: str, adapters: list[str], weights: list[float] | None, merged: Path,
                     qlora: str | None = None) -> float:
    """Max |logits(merged) − logits(base + adapters)| on a sample sentence, in fp32."""
    from loratune.adapters import load_adapter, set_active
    from loratune.config import ModelConfig, QuantConfig
    from loratune.models import load_model

    quant = QuantConfig(type=qlora) if qlora else None
    live, tok = load_model(ModelConfig(name=model, quantization=quant))
    names = {}
    for i, folder in enumerate(adapters):
        load_adapter(live, folder, f"a{i}")
        names[f"a{i}"] = 1.0 if weights is None else weights[i]
    set_active(live, names)
    ids = tok(SAMPLE, return_tensors="pt").input_ids
    expected = live(input_ids=ids).logits.float()
    del live
    plain, _ = load_model(ModelConfig(name=str(merged)))
    return float((plain(input_ids=ids).logits.float() - expected).abs().max())
