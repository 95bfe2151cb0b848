"""PEFT's adapter folder: the one place that knows its names, key layout, patterns and scale.

A folder holds `adapter_config.json` (its `peft_type` picks the method) and
`adapter_model.safetensors`, whose keys are `base_model.model.<HF module path>.<kind>` (kind e.g.
`lora_A.weight`, `ia3_l`) or, for prompt learning, the bare `prompt_embeddings`. Per-module
`rank_pattern`/`alpha_pattern` override r and lora_alpha; a LoRA module's update is scaled by
alpha/r, or alpha/√r with `use_rslora`. Methods PEFT lacks (MoE-LoRA, bottleneck) use the same
layout under loratune's own peft_type (docs/bottleneck-format.md). Only safetensors is read:
pickle files (`adapter_model.bin`) are refused.

Training, loading, merging, GGUF export and the server all read folders through this module.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from loratune.adapters.registry import (AdapterError, method_names, method_record, peft_types,
                                        records_of_peft_type)
from loratune.config import AdapterConfig
from loratune.files import write_atomic_dir
from loratune.readers import CorruptFileError, check_finite, read_safetensors

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# The file key ending of an adapted layer's trained bias (bias: lora_only, vera_only, ...).
LAYER_BIAS = "base_layer.bias"
# A LoRA module's tensors: A [r, in] and B [out, r].
LORA_KINDS = ("lora_A.weight", "lora_B.weight")
# Keys or shapes that do not fit the loaded model nearly always mean the adapter was trained on
# another base (a bigger or smaller sibling); every loader says so in these words.
ANOTHER_BASE = "adapter for another base model?"
# Where the rank sits in the tensors of methods with one (the registry's has_rank): LoRA's
# A [r, in] and B [out, r] (DoRA's too), MoE-LoRA's A [experts, r, in] and B [experts, out, r].
RANK_AXES = {"lora_A.weight": 0, "lora_B.weight": 1, "moe_lora_A": 1, "moe_lora_B": 2}
# target_parameters of LoRA on fused experts (adapters/expert_lora.py), the only ones we read.
EXPERT_TARGETS = ["experts.gate_up_proj", "experts.down_proj"]
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


def lora_scale(alpha: float, r: int, use_rslora: bool) -> float:
    """The factor on B·A: alpha/r, or alpha/√r with rsLoRA (stable at large ranks)."""
    return alpha / (math.sqrt(r) if use_rslora else r)


def file_key(path: str, kind: str) -> str:
    """The file key of tensor `kind` of the module at `path` (e.g. `...q_proj.lora_A.weight`)."""
    return f"{PREFIX}{path}.{kind}"


def module_path(key: str) -> str | None:
    """The model path a prefixed key names (`base_model.model.x.y` -> `x.y`), else None."""
    return key[len(PREFIX):] if key.startswith(PREFIX) else None


def split_key(key: str, kinds: tuple[str, ...]) -> tuple[str, str] | None:
    """(module path, kind) for a per-module key ending in one of `kinds`, else None."""
    for kind in kinds:
        if key.startswith(PREFIX) and key.endswith("." + kind):
            return key[len(PREFIX):-len(kind) - 1], kind
    return None


def canonical_path(path: str) -> str:
    """A module's path as the unwrapped model names it: hosts that wrap a whole sublayer
    (bottleneck adapters around `mlp`) add `.base_layer` segments that files must not carry."""
    return path.replace(".base_layer.", ".")


def pattern_key(path: str, pattern: dict) -> str | None:
    """PEFT's rank/alpha patterns: the first key (a module path or regex) that matches `path`."""
    path = canonical_path(path)
    return next((key for key in pattern if re.fullmatch(rf"(.*\.)?{key}", path)), None)


def pattern_value(path: str, pattern: dict, default):
    """The value of the pattern's key for `path` (see pattern_key), else `default`."""
    key = pattern_key(path, pattern)
    return default if key is None else pattern[key]


class AdapterMismatch(AdapterError, CorruptFileError):
    """adapter_config.json and the tensors of one folder disagree. Both an AdapterError and a
    CorruptFileError: the folder is unusable as it stands, whichever a reader catches."""


def weights_file(folder: Path) -> Path:
    """The folder's adapter_model.safetensors; pickle files in its place are refused."""
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


def write_peft_folder(out_dir: str | Path, tensors: dict[str, torch.Tensor], config: dict,
                      overwrite: bool = False) -> Path:
    """Write an adapter folder atomically: tensors by file key, and adapter_config.json."""

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    return write_atomic_dir(Path(out_dir), fill, overwrite=overwrite, marker=CONFIG_NAME)


def read_adapter_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of `folder`'s adapter_model.safetensors, refused (CorruptFileError naming the
    file, and the tensor) when the file is truncated or garbled or a value is NaN or Inf."""
    path = weights_file(Path(folder))
    tensors = read_safetensors(path)
    check_finite(tensors, path)
    return tensors


def _config_object(path: Path) -> dict:
    """adapter_config.json's object; an AdapterError naming the file for anything else (a
    downloaded file may hold any bytes: json raises RecursionError on deep nesting)."""
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise AdapterError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise AdapterError(f"{path}: not valid JSON: {err}") from None
    except RecursionError:
        raise AdapterError(f"{path}: not valid JSON: nested too deeply") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{path}: expected a JSON object, got a {type(raw).__name__}")
    return raw


def read_adapter_config(folder: str | Path) -> tuple[AdapterConfig, dict]:
    """Parse adapter_config.json into the method's config (+ the raw dict); unknown keys warned."""
    folder = Path(folder)
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(f"{folder}: no {CONFIG_NAME} (is this an adapter folder?)")
    raw = _config_object(path)
    peft_type = raw.get("peft_type")
    records = records_of_peft_type(peft_type) if isinstance(peft_type, str) else []
    if not records:
        raise AdapterError(f"{path}: peft_type is {peft_type!r}; loratune reads "
                           f"{', '.join(peft_types())}")
    record = records[0]  # methods sharing a peft_type share the config class (lora, dora)
    cls = record.config_class
    # adapter.dtype is how this run trains, not a fact about the file: it is never read from one.
    fields = set(cls.model_fields) - {"method", "dtype"}
    # Newer PEFT versions add option keys; unset ones (null/false) change nothing here.
    unknown = sorted(k for k, v in raw.items()
                     if k not in fields and k not in _PEFT_ONLY and v not in (None, False))
    if unknown:
        warnings.warn(f"{path}: ignoring unknown keys {unknown}", stacklevel=2)
    values = {k: v for k, v in raw.items() if k in fields and v is not None}
    values = _with_expert_targets(values, raw, path)
    if isinstance(values.get("target_modules"), list) and values["target_modules"] == []:
        raise AdapterError(f"{path}: target_modules is empty")
    if record.files.loaded_options is not None:
        try:
            values = record.files.loaded_options(values)
        except ValueError as err:
            raise AdapterError(f"{path}: {err}") from None
    try:
        return cls(**values), raw
    except Exception as err:  # pydantic's message names the field
        raise AdapterError(f"{path}: {err}") from None


def _with_expert_targets(values: dict, raw: dict, path: Path) -> dict:
    """PEFT's target_parameters for fused experts become 'experts' in target_modules (how
    loratune names them); any other parameter target is refused, never dropped."""
    params = raw.get("target_parameters")
    if not params:
        return values
    if not isinstance(params, list) or sorted(params) != sorted(EXPERT_TARGETS):
        raise AdapterError(f"{path}: target_parameters is {params!r}; loratune reads LoRA on "
                           f"fused experts as exactly {EXPERT_TARGETS}")
    modules = values.get("target_modules") or []
    if isinstance(modules, str):
        raise AdapterError(f"{path}: target_modules is a regex ({modules!r}) beside "
                           "target_parameters; expected a list of module names")
    return {**values, "target_modules": [*modules, "experts"]}


def _expert_rank_ok(adapter: "PeftFolder", path: str, size: int, want: int) -> bool:
    """A fused-experts tensor holds r rows per expert (PEFT's ParamWrapper: A [E·r, in])."""
    leaf = path.removesuffix(".base_layer").rsplit(".", 1)[-1]
    return bool(adapter.raw.get("target_parameters")) and leaf == "experts" and size % want == 0


@dataclass
class PeftFolder:
    """An adapter folder as read: its config (`raw`: the JSON as written) and its tensors."""

    folder: Path
    config: AdapterConfig
    raw: dict
    tensors: dict[str, torch.Tensor]

    @property
    def weights_path(self) -> Path:
        return self.folder / WEIGHTS_NAME

    def modules(self) -> dict[str, dict[str, torch.Tensor]]:
        """module path -> {kind: tensor} for the per-module tensors. Kinds of other layer-level
        methods are split off too, so that a stray one is reported instead of ignored."""
        own = method_record(self.config.method).files.keys
        kinds = tuple(dict.fromkeys(own + tuple(k for m in method_names()
                                                if method_record(m).layer_level
                                                for k in method_record(m).files.keys)))
        by_module: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in self.tensors.items():
            found = split_key(key, kinds)
            if found is not None:
                by_module.setdefault(found[0], {})[found[1]] = tensor
        return by_module

    def copy_module(self, path: str, parts: dict[str, torch.Tensor],
                    live: dict[str, torch.Tensor]) -> None:
        """Copy `parts`, the file's tensors of the module at `path` (by kind, as `modules()`
        gives them), into `live` (kind -> tensor, e.g. a served block's file_tensors()),
        refusing a missing one or another shape."""
        for kind, t in live.items():
            got = parts.get(kind)
            if got is None or got.shape != t.shape:
                found = "is missing" if got is None else f"has shape {tuple(got.shape)}"
                raise AdapterError(f"{self.weights_path}: {file_key(path, kind)} {found}; this "
                                   f"model needs {tuple(t.shape)} ({ANOTHER_BASE})")
            with torch.no_grad():
                t.copy_(got)

    def expert_modules(self) -> dict[str, dict[str, torch.Tensor]]:
        """Fused-experts module path -> {kind: tensor} of a file with target_parameters, the
        kinds as ExpertLora.file_tensors() names them (PEFT nests gate_up_proj's pair under
        `experts.base_layer.`, down_proj's under `experts.`); {} for any other file."""
        if not self.raw.get("target_parameters"):
            return {}
        out: dict[str, dict[str, torch.Tensor]] = {}
        for path, parts in self.modules().items():
            experts = path.removesuffix(".base_layer")
            if experts.rsplit(".", 1)[-1] == "experts":
                lead = "base_layer." if path != experts else ""
                out.setdefault(experts, {}).update({lead + k: t for k, t in parts.items()})
        return out

    def layer_modules(self) -> dict[str, dict[str, torch.Tensor]]:
        """modules() without the fused experts' tensors: the linear layers the file adapts."""
        experts = self.expert_modules()
        return {p: parts for p, parts in self.modules().items()
                if p.removesuffix(".base_layer") not in experts}

    def lora_pairs(self) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """module path -> (A, B) of a LoRA file's linear layers, in key order (B None where it
        is missing); the fused experts' per-expert pairs are not such pairs (expert_modules)."""
        a_kind, b_kind = LORA_KINDS
        pairs, experts = {}, self.expert_modules()
        for key in sorted(self.tensors):
            found = split_key(key, (a_kind,))
            if found is not None and found[0].removesuffix(".base_layer") not in experts:
                pairs[found[0]] = (self.tensors[key], self.tensors.get(file_key(found[0], b_kind)))
        return pairs

    def rank(self, path: str) -> int:
        """The module's rank: its rank_pattern entry, else the config's r."""
        return pattern_value(path, self.raw.get("rank_pattern") or {}, self.config.r)

    def alpha(self, path: str) -> float:
        """The module's lora_alpha: its alpha_pattern entry, else the config's."""
        return pattern_value(path, self.raw.get("alpha_pattern") or {}, self.config.lora_alpha)

    def scale(self, path: str, r: int) -> float:
        """The factor on B·A of the module at `path`, whose rank is `r`."""
        return lora_scale(self.alpha(path), r, self.config.use_rslora)


    def rank_source(self, path: str) -> str:
        """Which config entry gives the module its rank: `r`, or `rank_pattern['<key>']`."""
        key = pattern_key(path, self.raw.get("rank_pattern") or {})
        return "r" if key is None else f"rank_pattern[{key!r}]"


def check_ranks(adapter: PeftFolder) -> None:
    """Refuse a folder whose config gives a module another rank than its tensors have; merge,
    training and serving would otherwise each make something different of it."""
    record = method_record(adapter.config.method)
    if not record.has_rank:
        return
    for path, parts in adapter.modules().items():
        want = adapter.rank(path)
        for kind, tensor in parts.items():
            axis = RANK_AXES.get(kind) if kind in record.files.keys else None
            if axis is None or tensor.dim() <= axis or tensor.shape[axis] == want:
                continue
            if _expert_rank_ok(adapter, path, tensor.shape[axis], want):
                continue
            source = adapter.rank_source(path)
            raise AdapterMismatch(
                f"{adapter.folder / CONFIG_NAME}: {source} is {want}, but {WEIGHTS_NAME} holds "
                f"{file_key(path, kind)} of shape {tuple(tensor.shape)}, rank "
                f"{tensor.shape[axis]}; the config and the tensors disagree (the update is "
                "scaled by lora_alpha / r, so a wrong r changes it): fix r or rank_pattern")


def read_peft_weights(folder: str | Path, config: AdapterConfig, raw: dict) -> PeftFolder:
    """The folder with its tensors, once they are known to fit its config (read_adapter_config):
    the one reader merge, training (init_from) and the server go through."""
    # An adapted layer's trained bias (bias: *_only) as PEFT 0.21 writes it, by its base layer;
    # read by the layer's own path, as earlier PEFT and `bias: all` name it.
    tensors = {k.replace(f".{LAYER_BIAS}", ".bias"): t
               for k, t in read_adapter_weights(folder).items()}
    adapter = PeftFolder(Path(folder), config, raw, tensors)
    check_ranks(adapter)
    return adapter


def read_peft_folder(folder: str | Path) -> PeftFolder:
    """Config and tensors of an adapter folder (see read_adapter_config, read_peft_weights)."""
    return read_peft_weights(folder, *read_adapter_config(folder))
