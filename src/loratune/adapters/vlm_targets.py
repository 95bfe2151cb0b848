"""`language`, `vision` and `projector` in `adapter.target_modules` / `modules_to_save`: the parts
of a vision-language model, found through its family's record (models/vision.FAMILIES) and
checked against the model's own module tree.

A shortcut is replaced by the exact module paths it stands for before anything is injected, so
the adapter's config, and the adapter_config.json written from it, name real modules: PEFT
reads the folder without knowing the shortcuts.
"""

from __future__ import annotations

from torch import nn

from loratune.adapters.registry import AdapterError
from loratune.models.vision import FAMILIES

SHORTCUTS = ("language", "vision", "projector")


def model_parts(model: nn.Module) -> dict[str, str]:
    """shortcut -> module path, for the parts this model holds (a text model holds none)."""
    config = getattr(model, "config", None)
    family = FAMILIES.get(getattr(config, "model_type", None))
    if family is None:
        return {}
    paths = {"language": family.language, "vision": family.vision,
             "projector": family.projector}
    return {part: path for part, path in paths.items() if path and _holds(model, path)}


def _holds(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def part_path(model: nn.Module, part: str, field: str) -> str:
    """The module path of `part`, or an error naming the field and the parts there are."""
    parts = model_parts(model)
    if part not in parts:
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        have = ", ".join(parts) or "none: not a vision-language model"
        raise AdapterError(f"adapter.{field} names '{part}', a part {kind} does not have "
                           f"(its parts: {have})")
    return parts[part]


def part_linears(model: nn.Module, part: str, candidates: list[str]) -> list[str]:
    """The candidate linear layers inside `part`. A part inside another (Qwen2.5-VL's merger
    inside model.visual) belongs to its own shortcut only: `vision` leaves the projector out."""
    prefix = part_path(model, part, "target_modules") + "."
    inner = [p + "." for k, p in model_parts(model).items()
             if k != part and p.startswith(prefix)]
    found = [c for c in candidates
             if c.startswith(prefix) and not any(c.startswith(p) for p in inner)]
    if not found:  # Gemma 3's projector: a bare weight matrix and a norm
        raise AdapterError(f"adapter.target_modules names '{part}', but {prefix[:-1]} holds no "
                           f"linear layer an adapter can wrap; train it whole with "
                           f"adapter.modules_to_save: [{part}]")
    return found


def resolve_target_shortcuts(model: nn.Module, target: list[str] | str,
                             candidates: list[str]) -> list[str] | str:
    """`target` with each shortcut replaced by the paths of its linear layers; names, a regex
    string and 'all-linear' stay as they are."""
    entries = [target] if isinstance(target, str) else list(target)
    if not any(e in SHORTCUTS for e in entries):
        return target
    out: list[str] = []
    for entry in entries:
        out += part_linears(model, entry, candidates) if entry in SHORTCUTS else [entry]
    return list(dict.fromkeys(out))


def resolve_saved_shortcuts(model: nn.Module, names: list[str]) -> list[str]:
    """modules_to_save with each shortcut replaced by its part's module path (the projector
    trained whole, say)."""
    return [part_path(model, n, "modules_to_save") if n in SHORTCUTS else n for n in names]


def resolve_shortcuts(model: nn.Module, config, candidates: list[str]):
    """`config` with target_modules and modules_to_save free of shortcuts (a copy, when any)."""
    update = {}
    if hasattr(config, "target_modules"):
        target = resolve_target_shortcuts(model, config.target_modules, candidates)
        if target is not config.target_modules:
            update["target_modules"] = target
    saved = list(getattr(config, "modules_to_save", None) or [])
    if any(n in SHORTCUTS for n in saved):
        update["modules_to_save"] = resolve_saved_shortcuts(model, saved)
    return config.model_copy(update=update) if update else config
