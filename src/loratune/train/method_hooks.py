"""What an adapter method adds to the training step: extra loss terms and a per-step rank budget.

MoE-LoRA adds its routers' load-balancing loss to every micro-batch; AdaLoRA adds the
orthogonality loss of its P/Q factors once per step and, after each optimizer step, reallocates
its rank budget from the gradients still held.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from loratune.adapters.moe_lora import take_aux_loss


@dataclass
class MethodHooks:
    model: nn.Module
    method: str
    name: str = "default"
    allocator: object | None = None
    ranks: dict = field(default_factory=dict)

    def micro_loss(self) -> torch.Tensor | None:
        """Loss terms the last forward left behind (MoE-LoRA balance), to add before backward."""
        return take_aux_loss(self.model) if self.method == "moe_lora" else None

    def step_loss(self) -> torch.Tensor | None:
        """Per-step terms that do not depend on the batch (AdaLoRA orthogonality)."""
        if self.method != "adalora":
            return None
        from loratune.adapters.adaptive import orthogonal_loss

        return orthogonal_loss(self.model, self.name)

    def after_step(self, step: int) -> None:
        """Call after optimizer.step(), before zero_grad: AdaLoRA reads the gradients."""
        if self.allocator is not None:
            self.allocator.update_and_allocate(self.model, self.name, step)

    def summary(self) -> dict:
        if self.method != "adalora":
            return {}
        from loratune.adapters.adaptive import final_ranks

        ranks = final_ranks(self.model, self.name)
        return {"final_ranks": ranks, "total_rank": sum(ranks.values())}


def method_hooks(model: nn.Module, config, name: str, total_steps: int) -> MethodHooks:
    allocator = None
    if config.method == "adalora":
        from loratune.adapters.adaptive import RankAllocator

        from loratune.adapters.adaptive import adalora_modules

        if config.total_step is None:
            config = config.model_copy(update={"total_step": total_steps})
            for _, ad in adalora_modules(model, name):  # the saved config must name it too
                ad.config = config
        allocator = RankAllocator(model, config, name)
    return MethodHooks(model, config.method, name, allocator)
