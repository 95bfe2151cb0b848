"""Save and load a model's adapters as PEFT folders (the format itself: peft_format.py).

No adapter name is stored in a folder. `peft_type` names the method: PEFT's LORA, IA3, ADALORA,
PROMPT_TUNING, PREFIX_TUNING, and our own LORATUNE_MOE_LORA and LORATUNE_BOTTLENECK (documented
in docs/adapter-formats.md; PEFT has no such methods). Each method's record says which fields
its adapter_config.json adds and how a fresh adapter is fitted to a file before it is filled.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from loratune.adapters.expert_lora import expert_peft_fields
from loratune.adapters.host import hosts, saved_modules
from loratune.adapters.inject import add_adapter, adapter_config, delete_adapter
from loratune.adapters.peft_format import (ANOTHER_BASE, CONFIG_NAME, LAYER_BIAS, PREFIX,
                                           WEIGHTS_NAME, canonical_path, file_key,
                                           read_adapter_config, read_peft_weights,
                                           write_peft_folder)
from loratune.adapters.registry import AdapterError, method_names, method_record
from loratune.config import AdapterConfig
from loratune.config.methods import trains_layer_biases
from loratune.data.new_tokens import grow_for_adapter


def _bias_key(param_name: str) -> str:
    """The file key of a trained bias, named by the unwrapped model's path."""
    return PREFIX + param_name.replace(".base_layer.", ".").replace(".original.", ".")


def adapter_state_dict(model: nn.Module, name: str = "default",
                       compact: bool = True) -> dict[str, torch.Tensor]:
    """What the file holds for adapter `name`: file key -> tensor (on CPU, contiguous).

    `compact=False` keeps every tensor at its live size (AdaLoRA's pruned ranks included), as
    training checkpoints need for an exact resume."""
    config = adapter_config(model, name)
    bias = getattr(config, "bias", "none")
    state: dict[str, torch.Tensor] = {}
    for path, host in hosts(model):
        if name in host.adapters:
            saved = host.saved_tensors if compact else host.file_tensors
            state.update(saved(name, canonical_path(path)))
            if trains_layer_biases(config) and getattr(host, "bias", None) is not None:
                state[file_key(canonical_path(path), LAYER_BIAS)] = host.bias
    if bias == "all":
        for pname, param in model.named_parameters():
            if pname.endswith(".bias") and ".copies." not in pname:
                state[_bias_key(pname)] = param
    for path, saved_mod in saved_modules(model):
        if name in saved_mod.copies:
            for pname, param in saved_mod.copies[name].state_dict().items():
                state[file_key(canonical_path(path), pname)] = param
    return _unshared({k: v.detach().contiguous().cpu() for k, v in state.items()})


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor with storage of its own: tied embeddings trained as modules_to_save are one
    matrix under two keys, and safetensors refuses to write shared storage (PEFT writes both)."""
    seen: set[int] = set()
    out = {}
    for key, tensor in state.items():
        ptr = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone() if ptr in seen else tensor
        seen.add(ptr)
    return out


def config_dict(model: nn.Module, name: str, base_model: str | None = None,
                compact: bool = True) -> dict:
    """adapter_config.json for adapter `name`, as PEFT writes it for the method's peft_type."""
    config = adapter_config(model, name)
    record = method_record(config.method)
    fields = config.model_dump(exclude={"method", "use_dora", "dtype"})
    if record.files.peft_fields is not None:
        fields.update(record.files.peft_fields(model, name, config, compact))
    fields = expert_peft_fields(model, name, fields)
    fields.update(peft_type=record.peft_type, task_type="CAUSAL_LM",
                  base_model_name_or_path=base_model, inference_mode=True, revision=None)
    fields["modules_to_save"] = list(getattr(config, "modules_to_save", []) or []) or None
    return fields


def save_adapter(model: nn.Module, out_dir: str | Path, name: str = "default",
                 base_model: str | None = None, overwrite: bool = False,
                 compact: bool = True) -> Path:
    """Write adapter `name` as a PEFT folder (atomically); see adapter_state_dict on compact."""
    state = adapter_state_dict(model, name, compact)
    config = config_dict(model, name, base_model, compact)
    return write_peft_folder(out_dir, state, config, overwrite=overwrite)


def adapter_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """File key -> the live tensor it loads into, for adapter `name`."""
    config = adapter_config(model, name)
    out: dict[str, torch.Tensor] = {}
    for path, host in hosts(model):
        if name in host.adapters:
            out.update(host.file_tensors(name, canonical_path(path)))
    if getattr(config, "bias", "none") != "none":
        for pname, param in model.named_parameters():
            if pname.endswith(".bias") and ".copies." not in pname:
                out[_bias_key(pname)] = param
    for path, saved in saved_modules(model):
        if name in saved.copies:
            for pname, param in saved.copies[name].state_dict(keep_vars=True).items():
                out[file_key(canonical_path(path), pname)] = param
    return out


def _writers(key: str) -> list[str]:
    """The peft_types of the methods that write tensors named like `key`."""
    types = [method_record(m).peft_type for m in method_names()
             if any(key == k or key.endswith("." + k) for k in method_record(m).files.keys)]
    return list(dict.fromkeys(types))


def copy_adapter_weights(model: nn.Module, name: str, weights: dict[str, torch.Tensor],
                         source: Path) -> None:
    """Check keys and shapes strictly (naming the first bad tensor), then copy in place."""
    expected = adapter_tensors(model, name)
    # Biases are optional in a file: an adapter may train none of them.
    missing = [k for k in expected if k not in weights and not k.endswith(".bias")]
    unexpected = [k for k in weights if k not in expected]
    own = method_record(adapter_config(model, name).method).peft_type
    for key in unexpected:
        writers = _writers(key)
        if writers and own not in writers:
            raise AdapterError(f"{source}: {WEIGHTS_NAME} holds {' or '.join(writers)} tensors "
                               f"({key}) but {CONFIG_NAME} says peft_type {own}; the folder is "
                               "inconsistent (files from two different adapters?)")
    if unexpected:
        raise AdapterError(f"{source}: tensor {unexpected[0]} has no place in this model "
                           f"({len(unexpected)} unexpected; {ANOTHER_BASE})")
    if missing:
        raise AdapterError(f"{source}: tensor {missing[0]} is missing from the file "
                           f"({len(missing)} missing; {ANOTHER_BASE})")
    for key, tensor in weights.items():
        if tuple(expected[key].shape) != tuple(tensor.shape):
            raise AdapterError(f"{source}: tensor {key} has shape {tuple(tensor.shape)}, the "
                               f"model expects {tuple(expected[key].shape)} ({ANOTHER_BASE})")
    with torch.no_grad():
        for key, tensor in weights.items():
            expected[key].copy_(tensor.to(expected[key].dtype))


def load_adapter(model: nn.Module, folder: str | Path, name: str = "default",
                 tokenizer=None) -> AdapterConfig:
    """Inject adapter `name` from a PEFT folder and load its weights; strict about keys/shapes."""
    folder = Path(folder)
    config, raw = read_adapter_config(folder)
    weights = read_peft_weights(folder, config, raw).tensors
    record = method_record(config.method)
    patterns = {}
    if record.has_rank:
        patterns = {"rank_pattern": raw.get("rank_pattern") or {},
                    "alpha_pattern": raw.get("alpha_pattern") or {}}
    grow_for_adapter(model, tokenizer, folder)  # data.add_tokens: the rows its file holds
    add_adapter(model, config, name, tokenizer=tokenizer, **patterns)
    try:
        if record.files.before_load is not None:
            record.files.before_load(model, name, raw, weights)
        copy_adapter_weights(model, name, weights, folder)
    except (AdapterError, ValueError) as err:
        delete_adapter(model, name)
        raise AdapterError(str(err)) from None
    return config
