"""LoHa: ΔW = (W1a·W1b) ⊙ (W2a·W2b) · alpha/r, the Hadamard product of two rank-r products
(FedPara, Hyeon-Woo et al. 2022; PEFT's LOHA, after LyCORIS).

With the parameters of two rank-r LoRAs the product reaches rank up to r². W2b starts at 0, so a
fresh adapter changes nothing; the others start like a fresh linear layer's weight (He uniform).
"""

from __future__ import annotations

import torch

from loratune.adapters.delta_weight import DeltaWeightAdapter, factored_peft_fields, he_uniform
from loratune.adapters.registry import FileSpec, MethodRecord, register
from loratune.config import LoHaConfig

LOHA_KINDS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


class LohaAdapter(DeltaWeightAdapter):
    """W1a, W2a [out, r] and W1b, W2b [r, in] (PEFT's shapes and names)."""

    def make_factors(self, r: int, device) -> dict[str, torch.Tensor]:
        out_f, in_f = self.out_features, self.in_features
        w2_b = (torch.zeros(r, in_f, device=device) if self.config.init_weights
                else he_uniform(r, in_f, device=device))
        return {"hada_w1_a": he_uniform(out_f, r, device=device),
                "hada_w1_b": he_uniform(r, in_f, device=device),
                "hada_w2_a": he_uniform(out_f, r, device=device), "hada_w2_b": w2_b}

    def unscaled_delta(self) -> torch.Tensor:
        return (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)


def new_loha(config: LoHaConfig, path: str, in_features: int, out_features: int, *,
             r: int | None = None, alpha: float | None = None, device=None, dtype=None
             ) -> LohaAdapter:
    return LohaAdapter(in_features, out_features, config, r, alpha, device, dtype)


register(MethodRecord(
    name="loha", config_class=LoHaConfig, peft_type="LOHA",
    files=FileSpec(LOHA_KINDS, peft_fields=factored_peft_fields), make_layer=new_loha,
    has_rank=True))
