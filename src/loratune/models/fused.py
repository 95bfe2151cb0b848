"""Fused projections: one linear layer that holds several (Phi-3's `qkv_proj` = [q | k | v]
rows, `gate_up_proj` = [gate | up] rows).

A `target_modules` list may name the parts (`k_proj`, `v_proj`); adapter code needs to know
which output rows of which fused layer they are, to adapt exactly those rows or refuse.
"""

from __future__ import annotations

import re

from torch import nn

# fused leaf name -> its parts, in the order of the output rows
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _part_sizes(config, leaf: str) -> tuple[int, ...]:
    if leaf == "qkv_proj":
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return heads * head_dim, kv * head_dim, kv * head_dim
    return config.intermediate_size, config.intermediate_size


def fused_layers(model: nn.Module, paths: list[str]) -> dict[str, dict[str, range]]:
    """Module path -> {part name: its output rows} for the fused layers among `paths`.

    A layer named like a fused one whose rows do not add up to the config's shapes is refused
    by name rather than sliced by guess.
    """
    config = getattr(model, "config", None)
    out = {}
    for path in paths:
        leaf = path.rsplit(".", 1)[-1]
        if leaf not in FUSED or config is None:
            continue
        layer = model.get_submodule(path)
        layer = getattr(layer, "base_layer", layer)
        sizes = _part_sizes(config, leaf)
        if sum(sizes) != layer.out_features:
            raise ValueError(f"{path}: a fused {'/'.join(FUSED[leaf])} layer of "
                             f"{layer.out_features} output rows, but {type(model).__name__}'s "
                             f"config gives parts of {list(sizes)}; its layout is unknown")
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        out[path] = {part: range(s, s + n) for part, s, n in zip(FUSED[leaf], starts, sizes)}
    return out


def named_parts(target: list[str] | str, fused: dict[str, dict[str, range]]) -> dict[str, list[str]]:
    """Fused layer path -> the parts `target` names: by leaf name in a list, or, for a regex,
    the parts whose unfused path (`...self_attn.k_proj`) it matches."""
    if target == "all-linear" or target == ["all-linear"]:
        return {}
    found = {}
    for path, parts in fused.items():
        prefix = path[: len(path) - len(path.rsplit(".", 1)[-1])]
        if isinstance(target, str):
            named = [p for p in parts if re.fullmatch(target, prefix + p)]
        else:
            leaves = {t.rsplit(".", 1)[-1] for t in target}
            named = [p for p in parts if p in leaves]
        if named:
            found[path] = named
    return found
