"""The load-balancing loss of a mixture-of-experts base whose router trains.

transformers computes it in the ForCausalLM forward (with `output_router_logits`), from the
router logits its base model records (`_can_record_outputs["router_logits"]`), and adds
`router_aux_loss_coef` times it to the loss when labels are given. Our loss never runs that head
(train/loss.py reads the body's hidden states), so a router trained whole through
`adapter.modules_to_save` would learn from the token loss alone and can collapse onto a few
experts. `RouterBalance` records the same logits with forward hooks and adds the same term,
with the model's own `load_balancing_loss_func`, to every micro-batch, around the method's
hooks it wraps. A frozen router (the default) gets no term: no weight of it would move.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from loratune.adapters.registry import TrainingHooks


def trainable_routers(model: nn.Module) -> list[nn.Module]:
    """The router modules (the class transformers records router logits from) with a weight
    that trains; [] for a dense model or a frozen router."""
    recorder = getattr(getattr(model, "base_model", None), "_can_record_outputs", None) or {}
    router_class = getattr(recorder.get("router_logits"), "target_class", None)
    if router_class is None:
        return []
    return [m for m in model.modules() if isinstance(m, router_class)
            and any(p.requires_grad for p in m.parameters())]


def balance_loss_fn(model: nn.Module):
    """The family's own load_balancing_loss_func; None where it has none (DeepSeek-V3 balances
    with a bias instead of a loss)."""
    return getattr(sys.modules[type(model).__module__], "load_balancing_loss_func", None)


def with_router_balance(model: nn.Module, hooks: TrainingHooks) -> TrainingHooks:
    """`hooks`, plus the routers' balance loss when a router trains and the family has one."""
    routers, loss_fn = trainable_routers(model), balance_loss_fn(model)
    if not routers or loss_fn is None:
        return hooks
    return RouterBalance(hooks, model, routers, loss_fn)


class RouterBalance(TrainingHooks):
    """Adds coef · load_balancing_loss(router logits of the last forward) to each micro-batch."""

    def __init__(self, inner: TrainingHooks, model: nn.Module, routers: list[nn.Module],
                 loss_fn):
        self.inner, self.loss_fn = inner, loss_fn
        config = model.config
        self.coef = float(getattr(config, "router_aux_loss_coef", 0.0))
        self.num_experts = model.num_experts
        self.top_k = model.num_experts_per_tok
        self.logits: list[torch.Tensor] = []
        self.mask: torch.Tensor | None = None
        model.base_model.register_forward_pre_hook(self._start, with_kwargs=True)
        for router in routers:
            router.register_forward_hook(self._record)

    def _start(self, module, args, kwargs):
        # a new forward: the last one's logits (an evaluation's, a forward never trained) go
        self.logits, self.mask = [], kwargs.get("attention_mask")

    def _record(self, module, args, out):
        if torch.is_grad_enabled():
            self.logits.append(out[0] if isinstance(out, tuple) else out)

    def balance_loss(self) -> torch.Tensor | None:
        if not self.logits or not self.coef:
            return None
        mask = self.mask if self.mask is not None and self.mask.dim() == 2 else None
        loss = self.loss_fn(tuple(self.logits), self.num_experts, self.top_k, mask)
        self.logits = []
        return self.coef * loss

    def micro_loss(self) -> torch.Tensor | None:
        terms = [t for t in (self.inner.micro_loss(), self.balance_loss()) if t is not None]
        return sum(terms) if terms else None

    def before_training(self, batches: Iterator[dict]) -> None:
        self.inner.before_training(batches)

    def step_loss(self) -> torch.Tensor | None:
        return self.inner.step_loss()

    def after_step(self, step: int) -> None:
        self.inner.after_step(step)

    def summary(self) -> dict:
        return {**self.inner.summary(), "router_balance_coef": self.coef}

    def state(self) -> dict[str, torch.Tensor]:
        return self.inner.state()

    def load_state(self, tensors: dict[str, torch.Tensor], where: Path) -> None:
        self.inner.load_state(tensors, where)
