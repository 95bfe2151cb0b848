"""What an adapter method adds to the training step: extra loss terms and per-step work.

Each method's record names its hooks (MoE-LoRA: the routers' balance loss per micro-batch;
AdaLoRA: an orthogonality loss per step and a rank budget reallocated after each optimizer
step); methods without any get `TrainingHooks`, which adds nothing.
"""

from __future__ import annotations

from torch import nn

from loratune.adapters.registry import TrainingHooks, method_record


def method_hooks(model: nn.Module, config, name: str, total_steps: int) -> TrainingHooks:
    """The training hooks of adapter `name` (method `config.method`) for a run of total_steps."""
    make = method_record(config.method).training.hooks
    return TrainingHooks() if make is None else make(model, config, name, total_steps)
