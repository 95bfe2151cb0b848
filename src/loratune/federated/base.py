"""The base model with the run's adapter, built once per process (server or client) and kept:
a client trains every round on the same model, only the adapter's tensors change.

The base fingerprint is what server and clients compare before any tensor is trusted: a hash
of the base's config and its weights' names, shapes and dtypes, computed once at load.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from torch import nn

from loratune.adapters.io import adapter_state_dict
from loratune.adapters.host import hosts
from loratune.adapters.peft_format import canonical_path, file_key
from loratune.config import RunConfig
from loratune.models import load_model
from loratune.train.loop import setup_adapter

_BUILT: dict[str, AdaptedBase] = {}  # one per base and adapter config in this process


@dataclass
class AdaptedBase:
    model: nn.Module
    tokenizer: object
    fingerprint: str
    init: dict[str, torch.Tensor]  # the adapter as train.seed initialises it: file key -> tensor

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.init.items()}

    def scales(self) -> dict[str, float]:
        """LoRA layer prefix (file keys up to `lora_A.weight`) -> s of ΔW = s·B·A."""
        out = {}
        for path, host in hosts(self.model):
            layer = host.adapters["default"] if "default" in host.adapters else None
            if hasattr(layer, "scaling"):
                out[file_key(canonical_path(path), "")] = float(layer.scaling)
        return out


def fingerprint(model: nn.Module) -> str:
    """sha256 of the base's config (paths and versions left out) and every weight's name, shape
    and dtype; two clients with the same base at different paths agree."""
    config = getattr(model, "config", None)
    described = {k: v for k, v in (config.to_dict() if config is not None else {}).items()
                 if not k.startswith("_") and k != "transformers_version"}
    weights = [(n, list(t.shape), str(t.dtype))
               for n, t in [*model.named_parameters(), *model.named_buffers()]]
    text = json.dumps([described, weights], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def adapted_base(cfg: RunConfig) -> AdaptedBase:
    """This process's base with the adapter of `cfg` added, loaded the first time it is asked
    for (a client process serves many rounds, and in simulation many clients)."""
    key = json.dumps([cfg.model.model_dump(mode="json"), cfg.adapter.model_dump(mode="json"),
                      cfg.train.seed], sort_keys=True)
    if key not in _BUILT:
        model, tokenizer = load_model(cfg.model)
        stamp = fingerprint(model)
        setup_adapter(cfg, model, tokenizer, _silent)  # seeded by train.seed: same on every side
        # Cloned: on CPU the state dict's tensors are the live parameters, which training moves.
        init = {k: v.clone() for k, v in adapter_state_dict(model).items()}
        _BUILT[key] = AdaptedBase(model, tokenizer, stamp, init)
    return _BUILT[key]


def _silent(*args, **kwargs) -> None:
    pass
