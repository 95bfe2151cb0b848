"""Put named adapters into an unmodified transformers model, switch them, merge them, take them out.

The model keeps its own class and module paths; only the targeted `nn.Linear`s are replaced by
`AdaptedLinear` (and `modules_to_save` by `SavedModule`) at the same path.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
from torch import nn

from loratune.adapters.dora import DoraAdapter
from loratune.adapters.lora import AdaptedLinear, LoraAdapter, SavedModule
from loratune.config import LoraConfig
from loratune.quant.linear4bit import Linear4bit
from loratune.models.modules import (
    describe_linear_names,
    matches_target,
    select_targets,
    set_submodule,
)

_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")
LINEAR_TYPES = (nn.Linear, Linear4bit)


class AdapterError(ValueError):
    pass


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLinear]]:
    for name, mod in model.named_modules():
        if isinstance(mod, AdaptedLinear):
            yield name, mod


def saved_modules(model: nn.Module) -> Iterator[tuple[str, SavedModule]]:
    for name, mod in model.named_modules():
        if isinstance(mod, SavedModule):
            yield name, mod


def _switchable(model: nn.Module) -> Iterator[AdaptedLinear | SavedModule]:
    for mod in model.modules():
        if isinstance(mod, (AdaptedLinear, SavedModule)):
            yield mod


def adapter_names(model: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for _, layer in adapted_layers(model):
        names.update(dict.fromkeys(layer.adapters))
    for _, saved in saved_modules(model):
        names.update(dict.fromkeys(saved.copies))
    return list(names)


def adapter_config(model: nn.Module, name: str) -> LoraConfig:
    for _, layer in adapted_layers(model):
        if name in layer.adapters:
            return layer.adapters[name].config
    raise AdapterError(f"no adapter named '{name}' (have: {adapter_names(model) or 'none'})")


def _plain_linear_names(model: nn.Module) -> list[str]:
    """Linear layers not yet wrapped, plus wrapped ones addressed by their own path."""
    names = []
    for name, mod in model.named_modules():
        if isinstance(mod, AdaptedLinear):
            names.append(name)
        elif isinstance(mod, LINEAR_TYPES) and not name.endswith(".base_layer"):
            if ".original" in name or ".copies." in name:
                continue
            names.append(name)
    return names


def _rank_for(path: str, pattern: dict[str, float], default):
    for key, value in pattern.items():
        if re.fullmatch(rf"(.*\.)?{key}", path):
            return value
    return default


def add_adapter(model: nn.Module, config: LoraConfig, name: str = "default",
                rank_pattern: dict[str, int] | None = None,
                alpha_pattern: dict[str, float] | None = None) -> list[str]:
    """Inject adapter `name` into the modules `config.target_modules` selects; returns their paths.

    The whole model is frozen, then only this adapter (and its bias/modules_to_save) trains.
    """
    if not _NAME.match(name):
        raise AdapterError(f"adapter name '{name}' must use letters, digits, '_' or '-'")
    if name in adapter_names(model):
        raise AdapterError(f"adapter '{name}' already exists; delete it first")
    targets = select_targets(model, config.target_modules, _plain_linear_names(model))
    if not targets:
        raise AdapterError(
            f"target_modules={config.target_modules!r} matches no linear layer. "
            f"Linear layers in this model: {describe_linear_names(model)}"
        )
    model.requires_grad_(False)
    for path in targets:
        layer = model.get_submodule(path)
        if not isinstance(layer, AdaptedLinear):
            layer = AdaptedLinear(layer)
            set_submodule(model, path, layer)
        base = layer.base_layer
        r = int(_rank_for(path, rank_pattern or {}, config.r))
        alpha = _rank_for(path, alpha_pattern or {}, config.lora_alpha)
        device, dtype = _adapter_placement(base)
        kind = DoraAdapter if config.use_dora else LoraAdapter
        layer.adapters[name] = kind(base.in_features, base.out_features, config, r=r,
                                    alpha=alpha, device=device, dtype=dtype)
        if config.use_dora:
            layer.adapters[name].init_magnitude(base)
    for path in _saved_targets(model, config.modules_to_save):
        module = model.get_submodule(path)
        if not isinstance(module, SavedModule):
            module = SavedModule(module)
            set_submodule(model, path, module)
        module.add_copy(name)
    set_active(model, name)
    mark_trainable(model, name)
    return targets


def _adapter_placement(base: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Adapters live beside their base layer, in its compute dtype (fp32 for 4-bit bases)."""
    if isinstance(base, Linear4bit):
        return base.packed.device, torch.float32
    return base.weight.device, base.weight.dtype


def _saved_targets(model: nn.Module, names: list[str]) -> list[str]:
    paths = []
    for target in names:
        found = [
            p for p, m in model.named_modules()
            if matches_target(p, [target]) and ".copies." not in p and not p.endswith(".original")
            and not isinstance(m, AdaptedLinear)
        ]
        if not found:
            raise AdapterError(f"modules_to_save entry '{target}' matches no module")
        paths.extend(p for p in found if not any(p.startswith(q + ".") for q in found))
    return paths


def mark_trainable(model: nn.Module, name: str) -> None:
    """Freeze everything, then unfreeze adapter `name` (plus biases as its config says)."""
    config = adapter_config(model, name)
    model.requires_grad_(False)
    for _, layer in adapted_layers(model):
        if name in layer.adapters:
            layer.adapters[name].requires_grad_(True)
            if config.bias == "lora_only" and layer.base_layer.bias is not None:
                layer.base_layer.bias.requires_grad_(True)
    if config.bias == "all":
        for pname, param in model.named_parameters():
            if pname.endswith(".bias"):
                param.requires_grad_(True)
    for _, saved in saved_modules(model):
        if name in saved.copies:
            saved.copies[name].requires_grad_(True)


def set_active(model: nn.Module, names: str | list[str] | dict[str, float]) -> None:
    """Activate one adapter, several (weight 1 each) or a weighted set {name: weight}."""
    if isinstance(names, str):
        names = {names: 1.0}
    elif not isinstance(names, dict):
        names = dict.fromkeys(names, 1.0)
    known = adapter_names(model)
    missing = [n for n in names if n not in known]
    if missing:
        raise AdapterError(f"unknown adapter(s) {missing}; have: {known or 'none'}")
    for mod in _switchable(model):
        if isinstance(mod, AdaptedLinear) and mod.merged and mod.merged != names:
            raise AdapterError("unmerge before changing the active adapters")
        mod.active = {n: float(w) for n, w in names.items()
                      if n in (mod.adapters if isinstance(mod, AdaptedLinear) else mod.copies)}


def active_adapters(model: nn.Module) -> dict[str, float]:
    active: dict[str, float] = {}
    for mod in _switchable(model):
        active.update(mod.active)
    return active


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Run the plain base model inside the block (merged weights are unmerged meanwhile)."""
    merged = {n: w for _, l in adapted_layers(model) for n, w in l.merged.items()}
    unmerge(model)
    mods = list(_switchable(model))
    previous = [m.disabled for m in mods]
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m, was in zip(mods, previous):
            m.disabled = was
        if merged:
            merge(model, merged)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name`; layers left with no adapter go back to plain modules."""
    if name not in adapter_names(model):
        raise AdapterError(f"no adapter named '{name}' (have: {adapter_names(model) or 'none'})")
    for path, layer in list(adapted_layers(model)):
        if name in layer.merged:
            raise AdapterError(f"adapter '{name}' is merged in {path}; unmerge first")
        if name in layer.adapters:
            del layer.adapters[name]
            layer.active.pop(name, None)
        if not layer.adapters:
            set_submodule(model, path, layer.base_layer)
    for path, saved in list(saved_modules(model)):
        if name in saved.copies:
            del saved.copies[name]
            saved.active.pop(name, None)
        if not saved.copies:
            set_submodule(model, path, saved.original)


def merge(model: nn.Module, names: dict[str, float] | None = None) -> None:
    """Fold the active (or given) adapters into the base weights: zero extra inference cost."""
    for _, layer in adapted_layers(model):
        layer.merge(names)


def unmerge(model: nn.Module) -> None:
    for _, layer in adapted_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapters and return the plain transformers model (no loratune modules)."""
    merge(model)
    for path, layer in list(adapted_layers(model)):
        set_submodule(model, path, layer.base_layer)
    for path, saved in list(saved_modules(model)):
        set_submodule(model, path, saved.current())
    return model


def trainable_report(model: nn.Module) -> tuple[int, int, str]:
    """Counts trainable vs all parameters (shared tensors counted once), PEFT's wording."""
    seen: set[int] = set()
    trainable = total = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    # 4-bit weights are buffers; count the parameters they stand for, as PEFT does
    total += sum(m.out_features * m.in_features for m in model.modules()
                 if isinstance(m, Linear4bit))
    pct = 100.0 * trainable / max(total, 1)
    return trainable, total, (
        f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {pct:.4f}"
    )


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
