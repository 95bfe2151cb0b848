"""What `train.objective` changes in the recipe: the loss, the data it reads, the starting
adapter and the reference policy.

`sft` is the next-token loss on labelled tokens; the preference objectives
(train/preference_loss.py) read pairs or KTO examples (data/preference_pairs.py) and score them
against a reference policy.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from loratune.adapters import AdapterError, add_adapter, load_adapter, mark_trainable, set_active
from loratune.config import ConfigError, RunConfig
from loratune.data.encode import IGNORE
from loratune.data.hf_datasets import held_out_config
from loratune.data.preference_pairs import build_preference_examples, preference_batches
from loratune.train.preference_loss import (REF_ADAPTER, PreferenceLoss, Reference,
                                            needs_reference)


class SftLoss:
    """The next-token loss (the runtime's default, causal_lm_loss) as an objective: summed
    over label tokens, no extra metrics."""

    objective = "sft"

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def take_metrics(self, total: Callable, prefix: str = "") -> dict[str, float]:
        return {}


Objective = SftLoss | PreferenceLoss


def is_preference(cfg: RunConfig) -> bool:
    return cfg.train.objective != "sft"


def training_objective(cfg: RunConfig) -> Objective:
    """The loss train.objective names; the reference is the frozen starting adapter when
    adapter.init_from is set, else the base (adapter off)."""
    if not is_preference(cfg):
        return SftLoss()
    ref = REF_ADAPTER if cfg.adapter.init_from and needs_reference(cfg.train.objective) else None
    return PreferenceLoss(cfg.train, Reference(ref), cfg.data.train_on)


# ------------------------------------------------------------------------------ the adapter


def start_adapter(cfg: RunConfig, model: nn.Module, tokenizer) -> None:
    """A new adapter as cfg.adapter says, or the one in adapter.init_from (trained further;
    a frozen copy of it is the reference of DPO/IPO/KTO)."""
    folder = cfg.adapter.init_from
    if not folder:
        add_adapter(model, cfg.adapter, "default", tokenizer=tokenizer)
        return
    if not Path(folder).is_dir():
        raise ConfigError(f"adapter.init_from: {folder} is not a folder (expected an adapter "
                          "folder with adapter_config.json)")
    try:
        loaded = load_adapter(model, folder, "default", tokenizer=tokenizer)
        if is_preference(cfg) and needs_reference(cfg.train.objective):
            load_adapter(model, folder, REF_ADAPTER, tokenizer=tokenizer)
    except AdapterError as err:
        raise ConfigError(f"adapter.init_from: {err}") from None
    given = cfg.adapter.model_dump(exclude_unset=True)
    if "method" in cfg.adapter.model_fields_set and cfg.adapter.method != loaded.method:
        raise ConfigError(f"adapter.method: {cfg.adapter.method}, but adapter.init_from "
                          f"{folder} holds a {loaded.method} adapter; leave method out")
    clash = sorted(k for k, v in given.items() if k not in ("method", "use_dora")
                   and getattr(loaded, k, v) != v)
    if clash:
        raise ConfigError(f"adapter.{clash[0]}: the options of adapter.init_from come from "
                          f"{folder}/adapter_config.json ({clash[0]}={getattr(loaded, clash[0])!r}"
                          "); leave them out")
    set_active(model, "default")
    mark_trainable(model, "default")
    cfg.adapter = loaded.model_copy(update={"init_from": folder})


# --------------------------------------------------------------------------------- the data


def preference_kind(cfg: RunConfig) -> str:
    return "unpaired" if cfg.train.objective == "kto" else "pairs"


def build_preference_data(cfg: RunConfig, tokenizer, paths: tuple[str, str | None]):
    """(training examples, held-out examples, stats) of a preference objective."""
    from loratune.data import split_heldout

    train_path, eval_path = paths
    kind = preference_kind(cfg)
    train_ex, stats = build_preference_examples(train_path, tokenizer, cfg.data, kind)
    eval_ex = []
    if eval_path:
        eval_ex, _ = build_preference_examples(eval_path, tokenizer, held_out_config(cfg.data),
                                               kind)
    elif cfg.data.eval_fraction:
        train_ex, eval_ex = split_heldout(train_ex, cfg.data.eval_fraction, cfg.train.seed)
    return train_ex, eval_ex, stats


def epoch_preference_batches(cfg: RunConfig, examples: list, pad_id: int,
                             epoch: int) -> list[dict]:
    return preference_batches(examples, cfg.train.batch_size, pad_id, cfg.train.seed, epoch)
