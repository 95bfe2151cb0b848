"""Module discovery: which linear layers a `target_modules` setting selects."""

from __future__ import annotations

import inspect
import re

from torch import nn

# transformers 5.24 renamed the decoder's cache argument (the old name stays accepted, with a
# warning, until 5.40): the hooks read and write whichever name the decoder declares.
CACHE_KEYWORDS = ("cache", "past_key_values")


def cache_keyword(forward) -> str | None:
    """The name under which `forward` takes the KV cache, or None."""
    params = inspect.signature(forward).parameters
    return next((k for k in CACHE_KEYWORDS if k in params), None)


def linear_module_names(model: nn.Module) -> list[str]:
    """Linear layers, full-precision or quantized (anything with in/out features)."""
    return [name for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) or type(mod).__name__ == "Linear4bit"]


def output_layer_names(model: nn.Module) -> set[str]:
    """Names of the output projection (lm_head), which 'all-linear' leaves alone as PEFT does."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name for name, mod in model.named_modules() if out is not None and mod is out}


def matches_target(name: str, target: list[str] | str) -> bool:
    """PEFT semantics: a string is a full-match regex; a list matches by exact name or suffix."""
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def select_targets(model: nn.Module, target: list[str] | str, candidates: list[str]) -> list[str]:
    """Module paths among `candidates` chosen by `target` (names, a regex, or 'all-linear')."""
    if target == "all-linear" or target == ["all-linear"]:
        skip = output_layer_names(model)
        return [n for n in candidates if n not in skip]
    return [n for n in candidates if matches_target(n, target)]


def describe_linear_names(model: nn.Module, limit: int = 12) -> str:
    """A short list of distinct leaf names of linear layers, for error messages."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in linear_module_names(model)})
    shown = ", ".join(leaves[:limit]) + (" ..." if len(leaves) > limit else "")
    return shown or "(none)"


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` at dotted `path` (the parent keeps its own class and attributes)."""
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, module)


def eos_ids(model: nn.Module, tokenizer) -> set[int]:
    """Every id that ends a reply: the generation config's eos list (Gemma's <end_of_turn>,
    Llama 3's <|eot_id|>, ...) and the tokenizer's eos."""
    ids = set()
    gen = getattr(model, "generation_config", None)
    for value in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return ids
