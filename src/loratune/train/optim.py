"""AdamW over the trainable parameters, with LoRA+ (a larger lr for B) as an option."""

from __future__ import annotations

import torch
from torch import nn

from loratune.config import TrainConfig


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    a_like, b_like = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_b = name.endswith("lora_B")
        (b_like if is_b and cfg.loraplus_lr_ratio else a_like).append(param)
    groups = [{"params": a_like, "lr": cfg.lr, "base_lr": cfg.lr}]
    if b_like:
        lr_b = cfg.lr * cfg.loraplus_lr_ratio
        groups.append({"params": b_like, "lr": lr_b, "base_lr": lr_b})
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    if not groups:
        raise ValueError("no trainable parameters: was an adapter added?")
    device = groups[0]["params"][0].device
    if cfg.optimizer == "adamw8bit" or (cfg.offload_optimizer and device.type != "cpu"):
        from loratune.quant.adamw8bit import AdamW8bit

        # With plain adamw, offload alone: the same class with every state kept in fp32.
        min_8bit = 4096 if cfg.optimizer == "adamw8bit" else float("inf")
        return AdamW8bit(groups, lr=cfg.lr, weight_decay=cfg.weight_decay,
                         min_8bit_size=min_8bit,
                         state_device="cpu" if cfg.offload_optimizer else None)
    # The fused kernel exists for CPU and CUDA in recent torch; fall back where it does not.
    fused = device.type in ("cpu", "cuda")
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    return optimizer.param_groups[0]["lr"]
