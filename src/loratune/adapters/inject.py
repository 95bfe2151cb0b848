"""Put named adapters into an unmodified transformers model, switch them, merge them, take them out.

The model keeps its own class and module paths. Adapters live in hosts (`AdapterHost`, see
host.py): layer-level methods use `AdaptedLinear` around the targeted linears; model-level ones
(prompt, prefix, bottleneck) attach hosts of their own. `modules_to_save` become `SavedModule`s.
What a method name means comes from its record in the registry.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from loratune.adapters.host import (AdaptedLinear, AdapterHost, SavedModule, adapted_layers,
                                    adapter_dtype, hosts, module_dtype, saved_modules)
from loratune.adapters.expert_lora import (ExpertHost, all_linear_note, expert_targets,
                                           experts_placement, group_targets)
from loratune.adapters.peft_format import pattern_value
from loratune.adapters.registry import AdapterError, method_record
from loratune.adapters.vlm_targets import resolve_shortcuts
from loratune.config import AdapterConfig
from loratune.config.methods import trains_layer_biases
from loratune.models.fused import FUSED, fused_layers, named_parts
from loratune.quant.linear4bit import Linear4bit
from loratune.models.modules import (
    describe_linear_names,
    matches_target,
    select_targets,
    set_submodule,
)

_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")
LINEAR_TYPES = (nn.Linear, Linear4bit)


def _switchable(model: nn.Module) -> Iterator[nn.Module]:
    for mod in model.modules():
        if isinstance(mod, (AdapterHost, SavedModule)):
            yield mod


def _members(mod: nn.Module) -> nn.ModuleDict:
    return mod.copies if isinstance(mod, SavedModule) else mod.adapters


def adapter_names(model: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for mod in _switchable(model):
        names.update(dict.fromkeys(_members(mod)))
    return list(names)


def adapter_config(model: nn.Module, name: str) -> AdapterConfig:
    for _, host in hosts(model):
        if name in host.adapters:
            return host.adapters[name].config
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


def add_adapter(model: nn.Module, config: AdapterConfig, name: str = "default",
                rank_pattern: dict[str, int] | None = None,
                alpha_pattern: dict[str, float] | None = None, tokenizer=None) -> list[str]:
    """Inject adapter `name` of method `config.method`; returns the paths it touched.

    The whole model is frozen, then only this adapter (and its bias/modules_to_save) trains.
    """
    if not _NAME.match(name):
        raise AdapterError(f"adapter name '{name}' must use letters, digits, '_' or '-'")
    if name in adapter_names(model):
        raise AdapterError(f"adapter '{name}' already exists; delete it first")
    record = method_record(config.method)
    # language / vision / projector become module paths: the stored config names real modules
    config = resolve_shortcuts(model, config, _plain_linear_names(model))
    model.requires_grad_(False)
    if record.layer_level:
        targets = _add_layer_adapters(model, config, name, rank_pattern or {}, alpha_pattern or {})
        if record.after_layers is not None:
            record.after_layers(model, config, name)
    else:
        before = {p for p, h in hosts(model) if name in h.adapters}
        record.attach(model, config, name, tokenizer)
        targets = [p for p, h in hosts(model) if name in h.adapters and p not in before]
    for path in _saved_targets(model, getattr(config, "modules_to_save", [])):
        module = model.get_submodule(path)
        if not isinstance(module, SavedModule):
            module = SavedModule(module)
            set_submodule(model, path, module)
        module.add_copy(name, adapter_dtype(config, module_dtype(module.original)))
    _tie_saved_embeddings(model, name)
    # New modules start in training mode; an adapter loaded into an eval-mode model for
    # inference must not run its dropouts (nor training-only paths) there.
    model.train(model.training)
    set_active(model, name)
    mark_trainable(model, name)
    return targets


def _add_layer_adapters(model: nn.Module, config: AdapterConfig, name: str,
                        rank_pattern: dict, alpha_pattern: dict) -> list[str]:
    candidates = _plain_linear_names(model)
    targets = select_targets(model, config.target_modules, candidates)
    targets += [p for p in group_targets(model, config.target_modules, candidates)
                if p not in targets]
    record = method_record(config.method)
    experts = _add_expert_adapters(model, config, name, rank_pattern, alpha_pattern)
    # Names of parts of a fused layer (Phi-3's k_proj inside qkv_proj) select its rows, or are
    # refused: never dropped silently.
    try:
        parts = named_parts(config.target_modules,
                            fused_layers(model, [c for c in candidates if c not in targets]))
    except ValueError as err:
        raise AdapterError(str(err)) from None
    if parts and not record.slices_outputs:
        raise AdapterError(_fused_refusal(model, config, parts))
    targets += sorted(parts)
    if not targets and experts:
        return experts
    if not targets:
        raise AdapterError(
            f"target_modules={config.target_modules!r} matches no linear layer. "
            f"Linear layers in this model: {describe_linear_names(model)}"
        )
    if record.check_targets is not None:
        record.check_targets(config, targets)
    for path in targets:
        layer = model.get_submodule(path)
        if not isinstance(layer, AdaptedLinear):
            layer = AdaptedLinear(layer)
            set_submodule(model, path, layer)
        base = layer.base_layer
        device, dtype = _adapter_placement(base, config)
        r = alpha = None
        if record.has_rank:
            r = int(pattern_value(path, rank_pattern, config.r))
            alpha = pattern_value(path, alpha_pattern, config.lora_alpha)
        ad = new_layer_adapter(config, path, base.in_features, base.out_features, r=r,
                               alpha=alpha, device=device, dtype=dtype)
        ad.init_from_base(base)
        if path in parts:
            fused = fused_layers(model, [path])[path]
            ad.restrict_outputs([i for part in parts[path] for i in fused[part]], parts[path])
        layer.adapters[name] = ad
    return targets + experts


def _add_expert_adapters(model: nn.Module, config: AdapterConfig, name: str,
                         rank_pattern: dict, alpha_pattern: dict) -> list[str]:
    """Per-expert adapters on the fused experts modules target_modules names ('experts'); with
    all-linear, one line says such modules exist and are left out (never silently)."""
    if config.target_modules in ("all-linear", ["all-linear"]):
        note = all_linear_note(model)
        if note:
            warnings.warn(note, stacklevel=4)
    paths = expert_targets(model, config.target_modules)
    record = method_record(config.method)
    if paths and record.make_experts is None:
        raise AdapterError(f"target_modules names the routed experts ({paths[0]}), held as "
                           f"fused 3-D parameters; {config.method} cannot adapt them (lora can: "
                           "PEFT's file format for them, target_parameters, holds plain LoRA "
                           "only, no DoRA)")
    for path in paths:
        host = model.get_submodule(path)
        if not isinstance(host, ExpertHost):
            host = ExpertHost(host)
            set_submodule(model, path, host)
        device, dtype = experts_placement(host.base_layer)
        host.adapters[name] = record.make_experts(
            config, path, host.base_layer, r=int(pattern_value(path, rank_pattern, config.r)),
            alpha=pattern_value(path, alpha_pattern, config.lora_alpha), device=device,
            dtype=adapter_dtype(config, dtype))
    return paths


def _fused_refusal(model: nn.Module, config: AdapterConfig, parts: dict[str, list[str]]) -> str:
    leaves = sorted({p.rsplit(".", 1)[-1] for p in parts})
    named = sorted({n for ns in parts.values() for n in ns})
    holds = "; ".join(f"{leaf} = [{' | '.join(FUSED[leaf])}]" for leaf in leaves)
    return (f"target_modules names {', '.join(named)}, which {type(model).__name__} fuses into "
            f"one weight ({holds}); {config.method} cannot adapt some rows of a fused weight "
            f"(its update would mix all of them, and a PEFT file has one adapter per module). "
            f"Target {', '.join(leaves)} (or all-linear) to adapt the fused layer whole")


def new_layer_adapter(config: AdapterConfig, path: str, in_features: int, out_features: int,
                      r: int | None = None, alpha: float | None = None, device=None,
                      dtype=None) -> nn.Module:
    """A fresh adapter of a layer-level method for the linear layer at `path` (in → out);
    r and alpha (None: the config's) matter to methods with a rank."""
    record = method_record(config.method)
    if not record.layer_level:
        raise AdapterError(f"method {config.method!r} does not adapt linear layers")
    return record.make_layer(config, path, in_features, out_features, r=r, alpha=alpha,
                             device=device, dtype=dtype)


def _adapter_placement(base: nn.Module, config: AdapterConfig
                       ) -> tuple[torch.device, torch.dtype]:
    """Adapters live beside their base layer, in fp32 or (`dtype: base`) its compute dtype."""
    if isinstance(base, Linear4bit):
        return base.packed.device, adapter_dtype(config, base.compute_dtype)
    return base.weight.device, adapter_dtype(config, base.weight.dtype)


def _tie_saved_embeddings(model: nn.Module, name: str) -> None:
    """A model that ties its output layer to its embeddings (tie_word_embeddings) keeps them
    one matrix when both are modules_to_save: the output copy shares the embedding copy's
    weight, so they train as one (one optimizer entry) and merge back into the tied base."""
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return
    if not (hasattr(model, "get_input_embeddings") and hasattr(model, "get_output_embeddings")):
        return
    src, dst = model.get_input_embeddings(), model.get_output_embeddings()
    if isinstance(src, SavedModule) and isinstance(dst, SavedModule) \
            and name in src.copies and name in dst.copies:
        dst.copies[name].weight = src.copies[name].weight


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
    bias = getattr(config, "bias", "none")
    model.requires_grad_(False)
    for _, host in hosts(model):
        if name in host.adapters:
            host.adapters[name].requires_grad_(True)
            if trains_layer_biases(config) and isinstance(host, AdaptedLinear) \
                    and host.bias is not None:
                host.base_layer.bias.requires_grad_(True)
    if bias == "all":
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
        if isinstance(mod, (AdaptedLinear, ExpertHost)) and mod.merged and mod.merged != names:
            raise AdapterError("unmerge before changing the active adapters")
        mod.active = {n: float(w) for n, w in names.items() if n in _members(mod)}


def active_adapters(model: nn.Module) -> dict[str, float]:
    active: dict[str, float] = {}
    for mod in _switchable(model):
        active.update(mod.active)
    return active


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Run the plain base model inside the block (merged weights are unmerged meanwhile)."""
    merged = {n: w for _, l in _merging_hosts(model) for n, w in l.merged.items()}
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
    """Remove adapter `name`; hosts left with no adapter give back the module they wrapped."""
    if name not in adapter_names(model):
        raise AdapterError(f"no adapter named '{name}' (have: {adapter_names(model) or 'none'})")
    for path, layer in _merging_hosts(model):
        if name in layer.merged:
            raise AdapterError(f"adapter '{name}' is merged in {path}; unmerge first")
    switchable = {id(m) for m in _switchable(model)}
    for path, mod in reversed([(p, m) for p, m in model.named_modules() if id(m) in switchable]):
        members = _members(mod)
        if name not in members:
            continue
        del members[name]
        mod.active.pop(name, None)
        if not members:
            _put_back(model, path, mod.original if isinstance(mod, SavedModule) else mod.unwrap())


def _put_back(model: nn.Module, path: str, original: nn.Module | None) -> None:
    """Replace the host at `path` by what it wrapped (None: the host was an added attribute)."""
    if original is None:
        parent, _, leaf = path.rpartition(".")
        delattr(model.get_submodule(parent) if parent else model, leaf)
    else:
        set_submodule(model, path, original)


def check_mergeable(model: nn.Module, names: dict[str, float] | None = None) -> None:
    """Raise, saying why, if any adapter to merge belongs to a method that cannot be merged."""
    for name in (active_adapters(model) if names is None else names):
        record = method_record(adapter_config(model, name).method)
        if not record.mergeable:
            raise AdapterError(f"adapter '{name}' ({record.name}) cannot be merged: "
                               f"{record.merge.why_not}. Load it on the base model instead "
                               "(loratune chat/eval/serve --adapter DIR).")


def merge(model: nn.Module, names: dict[str, float] | None = None) -> None:
    """Fold the active (or given) adapters into the base weights: zero extra inference cost."""
    check_mergeable(model, names)
    for _, layer in _merging_hosts(model):
        layer.merge(names)


def unmerge(model: nn.Module) -> None:
    for _, layer in _merging_hosts(model):
        layer.unmerge()


def _merging_hosts(model: nn.Module) -> Iterator[tuple[str, AdaptedLinear | ExpertHost]]:
    """Hosts that fold adapters into their base: linear layers and fused experts."""
    return ((p, h) for p, h in hosts(model) if isinstance(h, (AdaptedLinear, ExpertHost)))


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapters and return the plain transformers model (no loratune modules)."""
    merge(model)
    for path, host in reversed(list(hosts(model))):  # inner hosts first: paths stay valid
        _put_back(model, path, host.unwrap())
    for path, saved in reversed(list(saved_modules(model))):
        # A copy trained in fp32 goes back in the dtype of the module it replaces.
        kept, dtype = saved.current(), module_dtype(saved.original)
        set_submodule(model, path, kept if dtype is None else kept.to(dtype))
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
