"""AdamW over the trainable parameters, with LoRA+ (a larger lr for B) and an embedding lr
(train.embedding_lr, for embeddings trained through modules_to_save) as options."""

from __future__ import annotations

import torch
from torch import nn

from loratune.adapters.host import saved_modules
from loratune.config import TrainConfig


def embedding_params(model: nn.Module) -> set[int]:
    """ids of the trained copies (modules_to_save) of the token embeddings and of the output
    layer, known as a linear layer whose outputs are the vocabulary (an embedding's rows)."""
    vocab = {m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)}
    found = set()
    for _, saved in saved_modules(model):
        original = saved.original
        if isinstance(original, nn.Embedding) or (isinstance(original, nn.Linear)
                                                  and original.out_features in vocab):
            found.update(id(p) for copy in saved.copies.values() for p in copy.parameters())
    return found


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    a_like, b_like, embeddings = [], [], []
    embedding_ids = embedding_params(model) if cfg.embedding_lr else set()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in embedding_ids:
            embeddings.append(param)
            continue
        is_b = name.endswith("lora_B")
        (b_like if is_b and cfg.loraplus_lr_ratio else a_like).append(param)
    groups = [{"params": a_like, "lr": cfg.lr, "base_lr": cfg.lr}]
    if b_like:
        lr_b = cfg.lr * cfg.loraplus_lr_ratio
        groups.append({"params": b_like, "lr": lr_b, "base_lr": lr_b})
    if embeddings:
        groups.append({"params": embeddings, "lr": cfg.embedding_lr, "base_lr": cfg.embedding_lr})
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
