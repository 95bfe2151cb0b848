"""Adapter files in PEFT's format: adapter_config.json + adapter_model.safetensors.

Keys are `base_model.model.<HF module path>.<tensor>` (e.g. `.lora_A.weight`, `.ia3_l`) or, for
prompt learning, `prompt_embeddings`; no adapter name is stored. `peft_type` names the method:
PEFT's LORA, IA3, ADALORA, PROMPT_TUNING, PREFIX_TUNING, and our own LORATUNE_MOE_LORA and
LORATUNE_BOTTLENECK (documented in docs/adapter-formats.md; PEFT has no such methods).
Only safetensors is read: pickle files (`adapter_model.bin`) are refused.
"""

from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from loratune.adapters.inject import (
    AdapterError,
    adapted_layers,
    add_adapter,
    adapter_config,
    canonical_path,
    delete_adapter,
    hosts,
    saved_modules,
)
from loratune.config import (AdaLoraConfig, AdapterConfig, BottleneckConfig, IA3Config,
                             LoraConfig, MoeLoraConfig, PrefixConfig, PromptConfig)
from loratune.files import write_atomic_dir
from loratune.readers import check_finite, read_safetensors

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# Keys or shapes that do not fit the loaded model nearly always mean the adapter was trained on
# another base (a bigger or smaller sibling); every loader says so in these words.
ANOTHER_BASE = "adapter for another base model?"
# Keys PEFT writes that carry no meaning for a plain LoRA here; read and dropped quietly.
_PEFT_ONLY = {
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode",
    "fan_in_fan_out", "layers_to_transform", "layers_pattern", "auto_mapping", "rank_pattern",
    "alpha_pattern", "megatron_config", "megatron_core", "loftq_config",
    "layer_replication", "runtime_config", "lora_bias", "exclude_modules", "eva_config",
    "corda_config", "target_parameters", "trainable_token_indices", "qalora_group_size",
    "use_qalora", "peft_version", "alora_invocation_tokens", "arrow_config", "ensure_weight_tying",
    # prompt learning: derived from the base model, which we read instead
    "token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers",
    "tokenizer_name_or_path", "tokenizer_kwargs", "modules_to_save",
    # AdaLoRA: PEFT keeps LoRA's r beside init_r
    "r",
}
PEFT_TYPES = {"LORA": LoraConfig, "IA3": IA3Config, "ADALORA": AdaLoraConfig,
              "PROMPT_TUNING": PromptConfig, "PREFIX_TUNING": PrefixConfig,
              "LORATUNE_MOE_LORA": MoeLoraConfig, "LORATUNE_BOTTLENECK": BottleneckConfig}
METHOD_TYPES = {"lora": "LORA", "dora": "LORA", "ia3": "IA3", "adalora": "ADALORA",
                "prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING",
                "moe_lora": "LORATUNE_MOE_LORA", "bottleneck": "LORATUNE_BOTTLENECK"}


def _leaf_names(model: nn.Module, name: str, target) -> list[str] | str:
    if isinstance(target, str) and target != "all-linear":
        return target  # a regex keeps its exact meaning
    return sorted({p.rsplit(".", 1)[-1] for p, l in adapted_layers(model) if name in l.adapters})


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
            saved = host.file_tensors if not compact else getattr(host, "saved_tensors",
                                                                  host.file_tensors)
            state.update(saved(name, canonical_path(path)))
            if bias == "lora_only" and getattr(host, "bias", None) is not None:
                state[f"{PREFIX}{canonical_path(path)}.bias"] = host.bias
    if bias == "all":
        for pname, param in model.named_parameters():
            if pname.endswith(".bias") and ".copies." not in pname:
                state[PREFIX + pname.replace(".base_layer.", ".").replace(".original.", ".")] = (
                    param)
    for path, saved_mod in saved_modules(model):
        if name in saved_mod.copies:
            for pname, param in saved_mod.copies[name].state_dict().items():
                state[f"{PREFIX}{canonical_path(path)}.{pname}"] = param
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def _lora_fields(model: nn.Module, name: str, config) -> dict:
    layers = [(p, l.adapters[name]) for p, l in adapted_layers(model) if name in l.adapters]
    out = {"lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
           "target_modules": _leaf_names(model, name, config.target_modules),
           "bias": config.bias, "use_rslora": config.use_rslora,
           "init_lora_weights": config.init_lora_weights, "fan_in_fan_out": False,
           "layers_to_transform": None, "layers_pattern": None}
    if config.method in ("lora", "dora", "moe_lora"):
        out["r"] = config.r
        out["use_dora"] = config.use_dora
        out["rank_pattern"] = {canonical_path(p): a.r for p, a in layers if a.r != config.r}
        out["alpha_pattern"] = {canonical_path(p): a.alpha for p, a in layers
                                if a.alpha != config.lora_alpha}
    return out


def config_dict(model: nn.Module, name: str, base_model: str | None = None,
                compact: bool = True) -> dict:
    """adapter_config.json for adapter `name`, as PEFT writes it for the method's peft_type."""
    config = adapter_config(model, name)
    method = config.method
    fields = config.model_dump(exclude={"method", "use_dora"})
    if method in ("lora", "dora", "moe_lora", "adalora"):
        fields.update(_lora_fields(model, name, config))
    if method == "adalora":
        from loratune.adapters.adaptive import adalora_peft_config, rank_pattern

        fields.update(adalora_peft_config(config, rank_pattern(model, name) if compact else None))
    elif method == "ia3":
        fields.update(target_modules=_leaf_names(model, name, config.target_modules),
                      feedforward_modules=_leaf_names_ff(model, name, config),
                      fan_in_fan_out=False)
    elif method in ("prompt", "prefix"):
        module = importlib.import_module(f"loratune.adapters.{method}")
        fields.update(module.peft_config(model, config))
    elif method == "bottleneck":
        from loratune.adapters.bottleneck import bottleneck_config

        fields.update(bottleneck_config(config))
    fields.update(peft_type=METHOD_TYPES[method], task_type="CAUSAL_LM",
                  base_model_name_or_path=base_model, inference_mode=True, revision=None)
    fields["modules_to_save"] = list(getattr(config, "modules_to_save", []) or []) or None
    return fields


def _leaf_names_ff(model: nn.Module, name: str, config: IA3Config) -> list[str] | str:
    if isinstance(config.feedforward_modules, str):
        return config.feedforward_modules
    return sorted({p.rsplit(".", 1)[-1] for p, l in adapted_layers(model)
                   if name in l.adapters and l.adapters[name].feedforward})


def save_adapter(model: nn.Module, out_dir: str | Path, name: str = "default",
                 base_model: str | None = None, overwrite: bool = False,
                 compact: bool = True) -> Path:
    """Write adapter `name` as a PEFT folder (atomically); see adapter_state_dict on compact."""
    state = adapter_state_dict(model, name, compact)
    config = config_dict(model, name, base_model, compact)

    def fill(tmp: Path) -> None:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    return write_atomic_dir(Path(out_dir), fill, overwrite=overwrite, marker=CONFIG_NAME)


def read_adapter_config(folder: str | Path) -> tuple[AdapterConfig, dict]:
    """Parse adapter_config.json into the method's config (+ the raw dict); unknown keys warned."""
    folder = Path(folder)
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(f"{folder}: no {CONFIG_NAME} (is this an adapter folder?)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise AdapterError(f"{path}: not valid JSON: {err}") from None
    peft_type = raw.get("peft_type")
    if peft_type not in PEFT_TYPES:
        raise AdapterError(f"{path}: peft_type is {peft_type!r}; loratune reads "
                           f"{', '.join(PEFT_TYPES)}")
    cls = PEFT_TYPES[peft_type]
    fields = set(cls.model_fields) - {"method"}
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
    if cls is PromptConfig:
        # The trained embeddings come from the file; the text only mattered for the init.
        values["prompt_tuning_init"] = "random"
        values.pop("prompt_tuning_init_text", None)
    if cls is LoraConfig and raw.get("use_dora"):
        values["method"] = "dora"
    if raw.get("modules_to_save") and "modules_to_save" in fields:
        values["modules_to_save"] = raw["modules_to_save"]
    try:
        return cls(**values), raw
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


def read_adapter_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of `folder`'s adapter_model.safetensors, refused (CorruptFileError naming the
    file, and the tensor) when the file is truncated or garbled or a value is NaN or Inf."""
    path = _weights_file(Path(folder))
    tensors = read_safetensors(path)
    check_finite(tensors, path)
    return tensors


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
                out[PREFIX + pname.replace(".base_layer.", ".").replace(".original.", ".")] = param
    for path, saved in saved_modules(model):
        if name in saved.copies:
            for pname, param in saved.copies[name].state_dict(keep_vars=True).items():
                out[f"{PREFIX}{canonical_path(path)}.{pname}"] = param
    return out


# A tensor name that only one method writes tells which method a file came from.
_KEY_METHODS = {"lora_E": "ADALORA", "ia3_l": "IA3", "moe_router": "LORATUNE_MOE_LORA",
                "adapter_down": "LORATUNE_BOTTLENECK", "prompt_embeddings": "PROMPT_TUNING",
                "lora_A": "LORA"}


def _method_of_keys(keys: list[str]) -> str | None:
    for marker, peft_type in _KEY_METHODS.items():
        if any(marker in k for k in keys):
            return peft_type
    return None


def copy_adapter_weights(model: nn.Module, name: str, weights: dict[str, torch.Tensor],
                         source: Path) -> None:
    """Check keys and shapes strictly (naming the first bad tensor), then copy in place."""
    expected = adapter_tensors(model, name)
    # Biases are optional in a file: an adapter may train none of them.
    missing = [k for k in expected if k not in weights and not k.endswith(".bias")]
    unexpected = [k for k in weights if k not in expected]
    stray_method = _method_of_keys(unexpected)
    if unexpected and stray_method and stray_method != METHOD_TYPES[adapter_config(model, name).method]:
        raise AdapterError(f"{source}: {WEIGHTS_NAME} holds {stray_method} tensors "
                           f"({unexpected[0]}) but {CONFIG_NAME} says peft_type "
                           f"{METHOD_TYPES[adapter_config(model, name).method]}; the folder is "
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
    weights = read_adapter_weights(folder)
    patterns = {}
    if config.method in ("lora", "dora", "moe_lora"):
        patterns = {"rank_pattern": raw.get("rank_pattern") or {},
                    "alpha_pattern": raw.get("alpha_pattern") or {}}
    add_adapter(model, config, name, tokenizer=tokenizer, **patterns)
    try:
        if config.method == "adalora":
            from loratune.adapters.adaptive import apply_rank_pattern

            apply_rank_pattern(model, name, raw.get("rank_pattern"), weights)
        copy_adapter_weights(model, name, weights, folder)
    except (AdapterError, ValueError) as err:
        delete_adapter(model, name)
        raise AdapterError(str(err)) from None
    return config
