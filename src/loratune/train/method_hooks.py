"""What an adapter method adds to the training step: extra loss terms and per-step work.

Each method's record names its hooks (MoE-LoRA: the routers' balance loss per micro-batch;
AdaLoRA: an orthogonality loss per step and a rank budget reallocated after each optimizer
step; LoRA: its init's, e.g. EVA fitted to the first batches); methods without any get
`TrainingHooks`, which adds nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

from torch import nn

from loratune.adapters.registry import TrainingHooks, method_record
from loratune.train.router_balance import with_router_balance


def method_hooks(model: nn.Module, config, name: str, total_steps: int,
                 data=None) -> TrainingHooks:
    """The training hooks of adapter `name` (method `config.method`) for a run of total_steps,
    their `before_training` run on `data`'s micro-batches (a TrainData) when given."""
    make = method_record(config.method).training.hooks
    hooks = TrainingHooks() if make is None else make(model, config, name, total_steps)
    hooks = with_router_balance(model, hooks)  # a router in modules_to_save: its balance loss
    if data is None:
        return hooks
    if not data.streaming:
        hooks.before_training(micro_batch_stream(data))
        return hooks
    start = data.checkpoint_state()  # a stream is read once: rewound after the hooks read it
    hooks.before_training(micro_batch_stream(data))
    data.resume({**start, "step": 0}, Path("the start of data.train"))
    return hooks


def micro_batch_stream(data) -> Iterator[dict]:
    """The run's micro-batches in training order, across epochs, without end."""
    return (batch for step in itertools.count() for batch in data.micro_batches(step))
