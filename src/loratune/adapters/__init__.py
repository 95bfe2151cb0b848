"""Adapters on a frozen base: LoRA layers, injection by module path, PEFT-format files.

Importing the package registers the built-in methods (each module ends with its record); the
order below is the order commands list them in.
"""

# isort: off
from loratune.adapters import lora, dora, ia3, adalora, prompt, prefix, moe_lora, bottleneck
from loratune.adapters import loha, lokr
from loratune.adapters import loftq, eva  # register init_lora_weights: loftq, eva
from loratune.adapters import vera, oft
# isort: on
from loratune.adapters.host import AdaptedLinear, AdapterHost, LayerAdapter, SavedModule
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
from loratune.adapters.io import load_adapter, save_adapter
from loratune.adapters.lora import LoraAdapter
from loratune.adapters.peft_format import read_adapter_config
from loratune.adapters.registry import (MethodRecord, TrainingHooks, method_names, method_record,
                                        register, unregister)

__all__ = [
    "AdaptedLinear",
    "AdapterError",
    "AdapterHost",
    "LayerAdapter",
    "LoraAdapter",
    "MethodRecord",
    "SavedModule",
    "TrainingHooks",
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
    "method_names",
    "method_record",
    "read_adapter_config",
    "register",
    "save_adapter",
    "set_active",
    "trainable_parameters",
    "trainable_report",
    "unmerge",
    "unregister",
]
