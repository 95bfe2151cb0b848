"""Adapter files in PEFT's format: adapter_config.json + adapter_model.safetensors.

Keys are `base_model.model.<HF module path>.lora_A.weight` / `.lora_B.weight`; no adapter name
is stored. Only safetensors is read: pickle files (`adapter_model.bin`) are refused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from loratune.adapters.inject import (
    AdapterError,
    adapted_layers,
    add_adapter,
    adapter_config,
    delete_adapter,
    saved_modules,
)
from loratune.config import LoraConfig

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# Keys PEFT writes that carry no meaning for a plain LoRA here; read and dropped quietly.
_PEFT_ONLY = {
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode",
    "fan_in_fan_out", "layers_to_transform", "layers_pattern", "auto_mapping", "rank_pattern",
    "alpha_pattern", "megatron_config", "megatron_core", "loftq_config",
    "layer_replication", "runtime_config", "lora_bias", "exclude_modules", "eva_config",
    "corda_config", "target_parameters", "trainable_token_indices", "qalora_group_size",
    "use_qalora", "peft_version", "alora_invocation_tokens", "arrow_config", "ensure_weight_tying",
}


def _target_modules_for_file(model: nn.Module, name: str, config: LoraConfig) -> list[str] | str:
    if isinstance(config.target_modules, str) and config.target_modules != "all-linear":
        return config.target_modules  # a regex keeps its exact meaning
    leaves = {p.rsplit(".", 1)[-1] for p, l in adapted_layers(model) if name in l.adapters}
    return sorted(leaves)


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    config = adapter_config(model, name)
    state: dict[str, torch.Tensor] = {}
    for path, layer in adapted_layers(model):
        if name not in layer.adapters:
            continue
        ad = layer.adapters[name]
        state[f"{PREFIX}{path}.lora_A.weight"] = ad.lora_A.detach()
        state[f"{PREFIX}{path}.lora_B.weight"] = ad.lora_B.detach()
        if config.use_dora:
            state[f"{PREFIX}{path}.lora_magnitude_vector"] = ad.lora_magnitude_vector.detach()
        if config.bias == "lora_only" and layer.base_layer.bias is not None:
            state[f"{PREFIX}{path}.bias"] = layer.base_layer.bias.detach()
    if config.bias == "all":
        for pname, param in model.named_parameters():
            if pname.endswith(".bias"):
                state[PREFIX + pname.replace(".base_layer.", ".").replace(".original.", ".")] = (
                    param.detach())
    for path, saved in saved_modules(model):
        if name in saved.copies:
            for pname, param in saved.copies[name].state_dict().items():
                state[f"{PREFIX}{path}.{pname}"] = param.detach()
    return {k: v.contiguous().cpu() for k, v in state.items()}


def config_dict(model: nn.Module, name: str, base_model: str | None = None) -> dict:
    config = adapter_config(model, name)
    ranks = {p: l.adapters[name].r for p, l in adapted_layers(model) if name in l.adapters}
    alphas = {p: l.adapters[name].alpha for p, l in adapted_layers(model) if name in l.adapters}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": _target_modules_for_file(model, name, config),
        "bias": config.bias,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "init_lora_weights": config.init_lora_weights,
        "modules_to_save": list(config.modules_to_save) or None,
        "rank_pattern": {p: r for p, r in ranks.items() if r != config.r},
        "alpha_pattern": {p: a for p, a in alphas.items() if a != config.lora_alpha},
        "fan_in_fan_out": False,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }


def write_atomic_dir(out: Path, fill, overwrite: bool = False) -> Path:
    """Create folder `out` by filling a temp sibling, then renaming it into place."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=out.parent))
    try:
        fill(tmp)
        os.chmod(tmp, 0o755)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def save_adapter(model: nn.Module, out_dir: str | Path, name: str = "default",
                 base_model: str | None = None, overwrite: bool = False) -> Path:
    """Write adapter `name` as a PEFT folder (atomically)."""
    state = adapter_state_dict(model, name)
    config = config_dict(model, name, base_model)

    def fill(tmp: Path) -> None:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    return write_atomic_dir(Path(out_dir), fill, overwrite=overwrite)


def read_adapter_config(folder: str | Path) -> tuple[LoraConfig, dict]:
    """Parse adapter_config.json into a LoraConfig (+ the raw dict); unknown keys warned about."""
    folder = Path(folder)
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(f"{folder}: no {CONFIG_NAME} (is this an adapter folder?)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise AdapterError(f"{path}: not valid JSON: {err}") from None
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(f"{path}: peft_type is {peft_type!r}; this loader reads LORA adapters")
    fields = set(LoraConfig.model_fields)
    # Newer PEFT versions add option keys; unset ones (null/false) change nothing here.
    unknown = sorted(k for k, v in raw.items()
                     if k not in fields and k not in _PEFT_ONLY and v not in (None, False))
    if unknown:
        warnings.warn(f"{path}: ignoring unknown keys {unknown}", stacklevel=2)
    values = {k: v for k, v in raw.items() if k in fields and v is not None}
    if isinstance(values.get("target_modules"), list) and values["target_modules"] == []:
        raise AdapterError(f"{path}: target_modules is empty")
    if values.get("init_lora_weights") not in (None, True, "gaussian"):
        values.pop("init_lora_weights")  # other inits only matter before training
    try:
        return LoraConfig(**values), raw
    except Exception as err:  # pydantic's message names the field
        raise AdapterError(f"{path}: {err}") from None


def _weights_file(folder: Path) -> Path:
    path = folder / WEIGHTS_NAME
    if path.is_file():
        return path
    pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt*")]
    if pickles:
        raise AdapterError(
            f"{folder}: found {', '.join(sorted(pickles))} but no {WEIGHTS_NAME}; pickle files are "
            "refused (they can run code when loaded). Convert the adapter to safetensors."
        )
    raise AdapterError(f"{folder}: no {WEIGHTS_NAME}")


def adapter_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """File key -> the live tensor it loads into, for adapter `name`."""
    config = adapter_config(model, name)
    out: dict[str, torch.Tensor] = {}
    for path, layer in adapted_layers(model):
        if name in layer.adapters:
            out[f"{PREFIX}{path}.lora_A.weight"] = layer.adapters[name].lora_A
            out[f"{PREFIX}{path}.lora_B.weight"] = layer.adapters[name].lora_B
            if config.use_dora:
                out[f"{PREFIX}{path}.lora_magnitude_vector"] = (
                    layer.adapters[name].lora_magnitude_vector)
    if config.bias != "none":
        for pname, param in model.named_parameters():
            if pname.endswith(".bias") and ".copies." not in pname:
                out[PREFIX + pname.replace(".base_layer.", ".").replace(".original.", ".")] = param
    for path, saved in saved_modules(model):
        if name in saved.copies:
            for pname, param in saved.copies[name].state_dict(keep_vars=True).items():
                out[f"{PREFIX}{path}.{pname}"] = param
    return out


def copy_adapter_weights(model: nn.Module, name: str, weights: dict[str, torch.Tensor],
                         source: Path) -> None:
    """Check keys and shapes strictly (naming the first bad tensor), then copy in place."""
    expected = adapter_tensors(model, name)
    # Biases are optional in a file: an adapter may train none of them.
    missing = [k for k in expected if k not in weights and not k.endswith(".bias")]
    unexpected = [k for k in weights if k not in expected]
    if unexpected:
        raise AdapterError(f"{source}: tensor {unexpected[0]} has no place in this model "
                           f"({len(unexpected)} unexpected; adapter trained on another base?)")
    if missing:
        raise AdapterError(f"{source}: tensor {missing[0]} is missing from the file "
                           f"({len(missing)} missing)")
    for key, tensor in weights.items():
        if tuple(expected[key].shape) != tuple(tensor.shape):
            raise AdapterError(f"{source}: tensor {key} has shape {tuple(tensor.shape)}, the "
                               f"model expects {tuple(expected[key].shape)} (another base model?)")
    with torch.no_grad():
        for key, tensor in weights.items():
            expected[key].copy_(tensor.to(expected[key].dtype))


def load_adapter(model: nn.Module, folder: str | Path, name: str = "default") -> LoraConfig:
    """Inject adapter `name` from a PEFT folder and load its weights; strict about keys/shapes."""
    folder = Path(folder)
    config, raw = read_adapter_config(folder)
    weights = load_file(str(_weights_file(folder)))
    add_adapter(model, config, name, rank_pattern=raw.get("rank_pattern") or {},
                alpha_pattern=raw.get("alpha_pattern") or {})
    try:
        copy_adapter_weights(model, name, weights, folder)
    except AdapterError:
        delete_adapter(model, name)
        raise
    return config
