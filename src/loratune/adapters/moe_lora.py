"""MoE-LoRA: several LoRA experts per layer, mixed per token by a learned router.

    gates = softmax(router(x))            (top_k: keep the k largest, renormalize)
    out   = base(x) + scale · Σ_e gates_e · B_e A_e x

Experts are stacked ([E, r, in] and [E, out, r]) so all of them run as two batched matmuls.
Training adds a load-balancing loss (Switch Transformer form: E · Σ_e f_e · P_e, where f_e is the
share of routing slots that went to expert e and P_e its mean gate), which keeps the router from
sending every token to one expert. Merging is impossible: the update differs token by token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loratune.adapters.host import LayerAdapter
from loratune.adapters.lora import checked_rank, lora_peft_fields
from loratune.adapters.peft_format import ANOTHER_BASE, PeftFolder, file_key, lora_scale
from loratune.adapters.registry import (AdapterError, FileSpec, MergeSpec, MethodRecord, RowBlock,
                                        ServingSpec, TrainingHooks, TrainingSpec, register)
from loratune.config import MoeLoraConfig

NOT_MERGEABLE = ("MoE-LoRA cannot be merged: its update depends on each token's routing, so no "
                 "single weight matrix equals it. Serve it unmerged (loratune chat/serve load it "
                 "as is), or train a plain LoRA for a merged model.")


class MoeLoraAdapter(LayerAdapter):
    def __init__(self, in_features: int, out_features: int, config: MoeLoraConfig,
                 r: int | None = None, alpha: float | None = None, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.r = checked_rank(r, config)
        self.alpha = config.lora_alpha if alpha is None else alpha
        self.scaling = lora_scale(self.alpha, self.r, config.use_rslora)
        n, kw = config.num_experts, {"device": device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.empty(n, self.r, in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(n, out_features, self.r, **kw))
        self.router = nn.Parameter(torch.zeros(n, in_features, **kw))
        self.aux_loss: torch.Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for a in self.lora_A:  # each expert starts like its own LoRA A
            if self.config.init_lora_weights == "gaussian":
                nn.init.normal_(a, std=1.0 / self.r)
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        # A small random router: a zero one gives every expert the same gradient forever.
        nn.init.normal_(self.router, std=0.02)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token expert weights [..., E] (zeros outside the top k)."""
        probs = F.softmax(F.linear(x, self.router).float(), dim=-1)
        k = self.config.top_k
        if k is not None and k < probs.shape[-1]:
            top, idx = probs.topk(k, dim=-1)
            gates = torch.zeros_like(probs).scatter(-1, idx, top / top.sum(-1, keepdim=True))
        else:
            gates = probs
        if self.training and self.config.router_aux_loss_coef:
            self.aux_loss = self._balance_loss(probs, gates)
        return gates

    def _balance_loss(self, probs: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        n = probs.shape[-1]
        chosen = (gates > 0).float().reshape(-1, n)
        share = chosen.sum(0) / chosen.sum().clamp(min=1)
        if self.config.top_k is None:  # dense routing: count each token's best expert
            best = probs.reshape(-1, n).argmax(-1)
            share = torch.bincount(best, minlength=n).float() / best.numel()
        mean_prob = probs.reshape(-1, n).mean(0)
        return self.config.router_aux_loss_coef * n * (share.detach() * mean_prob).sum()

    def add_to(self, out: torch.Tensor, x: torch.Tensor, weight: float = 1.0,
               base: nn.Module | None = None, base_out: torch.Tensor | None = None
               ) -> torch.Tensor:
        return out + self.update(x, weight).to(out.dtype)

    def update(self, x: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        """weight · scale · Σ_e gates_e · B_e A_e x, in the adapter's dtype."""
        x = x.to(self.lora_A.dtype)
        gates = self.gates(x).to(x.dtype)
        if self.config.lora_dropout and self.training:
            x = F.dropout(x, self.config.lora_dropout, training=True)
        # Two matmuls against every expert side by side (A as [E·r, in], B as [out, E·r]):
        # einsum's permutes and copies cost more than the products at serving sizes.
        n, r = self.lora_A.shape[:2]
        h = F.linear(x, self.lora_A.reshape(n * r, -1)).unflatten(-1, (n, r)) * gates.unsqueeze(-1)
        return weight * self.scaling * F.linear(h.flatten(-2), self.b_side_by_side())

    def b_side_by_side(self) -> torch.Tensor:
        """lora_B [E, out, r] as [out, E·r] (a copy)."""
        return self.lora_B.permute(1, 0, 2).reshape(self.lora_B.shape[1], -1)

    def merge_into(self, w, bias, weight):
        raise ValueError(NOT_MERGEABLE)

    unmerge_from = merge_into

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {"moe_lora_A": self.lora_A, "moe_lora_B": self.lora_B, "moe_router": self.router}


def take_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum (and clear) the load-balancing losses the last forward left on MoE-LoRA adapters."""
    total = None
    for mod in model.modules():
        if isinstance(mod, MoeLoraAdapter) and mod.aux_loss is not None:
            total = mod.aux_loss if total is None else total + mod.aux_loss
            mod.aux_loss = None
    return total


class MoeLoraHooks(TrainingHooks):
    """Adds the routers' load-balancing loss to every micro-batch."""

    def __init__(self, model: nn.Module):
        self.model = model

    def micro_loss(self) -> torch.Tensor | None:
        return take_aux_loss(self.model)


def new_moe_lora(config: MoeLoraConfig, path: str, in_features: int, out_features: int, *,
                 r: int | None = None, alpha: float | None = None, device=None, dtype=None
                 ) -> MoeLoraAdapter:
    return MoeLoraAdapter(in_features, out_features, config, r, alpha, device, dtype)


class ServedMoeLora(MoeLoraAdapter):
    """The experts as the server runs them for the rows that use them (registry.RowBlock):
    the update on the layer's input. Frozen, so B side by side is made once (`freeze`)."""

    def freeze(self) -> ServedMoeLora:
        self.register_buffer("b_flat", super().b_side_by_side().detach().clone(), persistent=False)
        return self.eval().requires_grad_(False)

    def b_side_by_side(self) -> torch.Tensor:
        return self.b_flat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.update(x)


def moe_lora_blocks(adapter: PeftFolder, model: nn.Module) -> dict[str, RowBlock]:
    """Per targeted linear layer of a served model, the file's experts and router in float32."""
    blocks = {}
    for path, parts in adapter.modules().items():
        try:
            layer = model.get_submodule(path)
        except AttributeError:
            layer = None
        if not hasattr(layer, "in_features"):
            raise AdapterError(f"{adapter.weights_path}: {file_key(path, 'moe_lora_A')} has no "
                               f"linear layer at {path} in this model ({ANOTHER_BASE})")
        r = adapter.rank(path)
        block = ServedMoeLora(layer.in_features, layer.out_features, adapter.config, r=r,
                              alpha=adapter.alpha(path), dtype=torch.float32)
        adapter.copy_module(path, parts, block.file_tensors())
        blocks[path] = RowBlock(block.freeze(), reads="input")
    return blocks


register(MethodRecord(
    name="moe_lora", config_class=MoeLoraConfig, peft_type="LORATUNE_MOE_LORA",
    files=FileSpec(("moe_lora_A", "moe_lora_B", "moe_router"), peft_fields=lora_peft_fields),
    make_layer=new_moe_lora, has_rank=True,
    training=TrainingSpec(
        hooks=lambda model, config, name, total_steps: MoeLoraHooks(model),
        unused_parameters=True),  # top-k routing leaves some experts without a grad
    merge=MergeSpec(why_not="MoE-LoRA's update depends on each token's routing, so no single "
                            "weight equals it"),
    # Served per row as a block on each layer's input: the router picks each token's experts.
    serving=ServingSpec(blocks=moe_lora_blocks,
                        why_no_composition="MoE-LoRA mixes its experts per token by its own "
                                           "router; adding another adapter's factors to it is no "
                                           "weighted sum of their outputs")))
