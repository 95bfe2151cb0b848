"""Adapters on a frozen base: LoRA layers, injection by module path, PEFT-format files."""

from loratune.adapters.inject import (
    AdapterError,
    active_adapters,
    adapter_config,
    adapter_names,
    add_adapter,
    delete_adapter,
    disable_adapters,
    mark_trainable,
    merge,
    merge_and_unload,
    set_active,
    trainable_parameters,
    trainable_report,
    unmerge,
)
from loratune.adapters.io import load_adapter, read_adapter_config, save_adapter
from loratune.adapters.lora import AdaptedLinear, LoraAdapter, SavedModule

__all__ = [
    "AdaptedLinear",
    "AdapterError",
    "LoraAdapter",
    "SavedModule",
    "active_adapters",
    "adapter_config",
    "adapter_names",
    "add_adapter",
    "delete_adapter",
    "disable_adapters",
    "load_adapter",
    "mark_trainable",
    "merge",
    "merge_and_unload",
    "read_adapter_config",
    "save_adapter",
    "set_active",
    "trainable_parameters",
    "trainable_report",
    "unmerge",
]
