"""VeRA: vector-based random matrix adaptation (Kopiczko et al. 2024; PEFT's VERA).

One pair of frozen random projections A [r, in_max] and B [out_max, r] serves every adapted
layer of an adapter, each layer using the corner it fits (A[:, :in], B[:out, :]); a layer trains
only d [r] and b [out]:
    out = base(x) + b ⊙ (B · (d ⊙ (A · x)))        ΔW = diag(b)·B·diag(d)·A
b starts at 0, so a fresh adapter changes nothing. A and B are drawn from projection_prng_key
exactly as PEFT draws them (He-uniform, A then B, from one CPU generator), so a file saved
without them (save_projection: false) reads back the same here and in PEFT. They sit in a host
at the model's root (`vera_projections`), written as PEFT's bare keys `base_model.vera_A/B`.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from loratune.adapters.host import AdapterHost, LayerAdapter, adapted_layers, leaf_names
from loratune.adapters.registry import (AdapterError, FileSpec, MethodRecord, TrainingSpec,
                                        register)
from loratune.config import VeraConfig

# PEFT's keys for the shared projections: model-level, outside any module path.
PROJECTION_KEYS = {"vera_A": "base_model.vera_A", "vera_B": "base_model.vera_B"}
HOST_ATTR = "vera_projections"


def he_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(-bound, bound), bound = √3·√2/√fan_in (fan_in = shape[1]), PEFT's `_kaiming_init`,
    drawn from `generator` in this order of operations so the values match bit for bit."""
    bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def draw_projections(config: VeraConfig, in_max: int, out_max: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """A [r, in_max] and B [out_max, r] from projection_prng_key, in fp32 on the CPU."""
    generator = torch.Generator(device="cpu").manual_seed(config.projection_prng_key)
    a = he_uniform((config.r, in_max), generator)  # A first: the order is part of the format
    return a, he_uniform((out_max, config.r), generator)


def stored_projections(tensors: dict[str, torch.Tensor], save_projection: bool
                       ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A file's (A, B) when its config says save_projection, else None; refused, as PEFT
    refuses it, when the config says so but the file lacks them."""
    if not save_projection:
        return None
    missing = [key for key in PROJECTION_KEYS.values() if key not in tensors]
    if missing:
        raise AdapterError(f"adapter_config.json says save_projection: true, but "
                           f"adapter_model.safetensors has no {' or '.join(missing)}; set "
                           "save_projection: false to draw them from projection_prng_key")
    return tensors[PROJECTION_KEYS["vera_A"]], tensors[PROJECTION_KEYS["vera_B"]]


class VeraProjection(nn.Module):
    """The frozen A [r, in_max] and B [out_max, r] one adapter's layers share (buffers)."""

    def __init__(self, config: VeraConfig, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.config = config
        self.register_buffer("vera_A", a)
        self.register_buffer("vera_B", b)


class VeraProjectionHost(AdapterHost):
    """Holds each VeRA adapter's projections at the model's root (no base layer)."""

    def file_tensors(self, name: str, path: str) -> dict[str, torch.Tensor]:
        projection = self.adapters[name]
        if not projection.config.save_projection:
            return {}  # drawn again from projection_prng_key on load
        return {key: getattr(projection, kind) for kind, key in PROJECTION_KEYS.items()}


class VeraAdapter(LayerAdapter):
    """A layer's trained vectors vera_lambda_d [r] and vera_lambda_b [out] (PEFT's names)."""

    def __init__(self, in_features: int, out_features: int, config: VeraConfig, device=None,
                 dtype=None):
        super().__init__()
        self.config = config
        self.in_features, self.out_features = in_features, out_features
        kw = {"device": device, "dtype": dtype}
        if config.init_weights:
            self.vera_lambda_b = nn.Parameter(torch.zeros(out_features, **kw))
            self.vera_lambda_d = nn.Parameter(torch.full((config.r,), config.d_initial, **kw))
        else:
            self.vera_lambda_b = nn.Parameter(torch.ones(out_features, **kw))
            self.vera_lambda_d = nn.Parameter(torch.randn(config.r, **kw))
        self.shared: VeraProjection | None = None

    def __setattr__(self, key, value):
        # The shared projection is owned by the root host; a submodule here would repeat its
        # buffers under every layer in state dicts.
        if key == "shared":
            object.__setattr__(self, key, value)
        else:
            super().__setattr__(key, value)

    @property
    def r(self) -> int:
        return self.config.r

    def projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's corners of the shared A and B."""
        if self.shared is None:
            raise AdapterError("VeRA layer has no projections: add it with add_adapter")
        return (self.shared.vera_A[:, :self.in_features],
                self.shared.vera_B[:self.out_features, :])

    def add_to(self, out: torch.Tensor, x: torch.Tensor, weight: float = 1.0,
               base: nn.Module | None = None, base_out: torch.Tensor | None = None
               ) -> torch.Tensor:
        a, b = self.projections()
        x = x.to(self.vera_lambda_d.dtype)
        if self.config.vera_dropout and self.training:
            x = F.dropout(x, self.config.vera_dropout, training=True)
        update = self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(x, a), b)
        return out + (weight * update).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """diag(b)·B·diag(d)·A in fp32."""
        a, b = self.projections()
        return ((self.vera_lambda_b.float()[:, None] * b.float())
                @ (self.vera_lambda_d.float()[:, None] * a.float()))

    def merge_into(self, w: torch.Tensor, bias: torch.Tensor | None, weight: float):
        return w + weight * self.delta_weight(), bias

    def unmerge_from(self, w: torch.Tensor, bias: torch.Tensor | None, weight: float):
        return w - weight * self.delta_weight(), bias

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {"vera_lambda_b": self.vera_lambda_b, "vera_lambda_d": self.vera_lambda_d}

    def fit_folder(self, folder, shapes: dict[str, tuple[int, ...]]) -> None:
        """Built alone (the streaming merge): the folder's own projections, or those drawn at
        the size of the largest layer it targets, as a model would hold them."""
        stored = stored_projections(folder.tensors, self.config.save_projection)
        if stored is None:
            stored = draw_projections(self.config, max(s[1] for s in shapes.values()),
                                      max(s[0] for s in shapes.values()))
        self.shared = VeraProjection(self.config, *stored)


def new_vera(config: VeraConfig, path: str, in_features: int, out_features: int, *,
             r: int | None = None, alpha: float | None = None, device=None, dtype=None
             ) -> VeraAdapter:
    return VeraAdapter(in_features, out_features, config, device=device, dtype=dtype)


def share_projections(model: nn.Module, config: VeraConfig, name: str) -> None:
    """Draw adapter `name`'s projections, as large as its largest layer needs (PEFT sizes them
    so), put them in the root host and point every layer of the adapter at them."""
    layers = [layer.adapters[name] for _, layer in adapted_layers(model) if name in layer.adapters]
    first = layers[0].vera_lambda_b
    a, b = draw_projections(config, max(ad.in_features for ad in layers),
                            max(ad.out_features for ad in layers))
    projection = VeraProjection(config, a.to(first.device, first.dtype),
                                b.to(first.device, first.dtype))
    host = getattr(model, HOST_ATTR, None)
    if host is None:
        host = VeraProjectionHost()
        model.add_module(HOST_ATTR, host)
    elif not isinstance(host, VeraProjectionHost):
        raise AdapterError(f"{type(model).__name__} already has an attribute '{HOST_ATTR}' "
                           f"({type(host).__name__}); cannot place VeRA's projections there")
    host.adapters[name] = projection
    for ad in layers:
        ad.shared = projection


def vera_peft_fields(model: nn.Module, name: str, config: VeraConfig,
                     compact: bool = True) -> dict:
    return {"target_modules": leaf_names(model, name, config.target_modules),
            "fan_in_fan_out": False, "layers_to_transform": None, "layers_pattern": None}


def check_projection_keys(model: nn.Module, name: str, raw: dict, weights: dict) -> None:
    """As PEFT: save_projection true needs both projections in the file; with false, any found
    are ignored (the ones drawn from projection_prng_key stay), with a warning."""
    if stored_projections(weights, raw.get("save_projection", True)) is not None:
        return
    found = [key for key in PROJECTION_KEYS.values() if key in weights]
    if found:
        warnings.warn(f"save_projection is false: ignoring {', '.join(found)} in the adapter "
                      "file and drawing the projections from projection_prng_key", stacklevel=2)
        for key in found:
            del weights[key]


register(MethodRecord(
    name="vera", config_class=VeraConfig, peft_type="VERA",
    files=FileSpec(("vera_lambda_b", "vera_lambda_d", *PROJECTION_KEYS),
                   peft_fields=vera_peft_fields, before_load=check_projection_keys),
    make_layer=new_vera, after_layers=share_projections,
    training=TrainingSpec(plan_note="estimated as LoRA of rank r, an upper bound: VeRA trains "
                          "only r + out values per layer, beside frozen projections of "
                          "r·(in + out) values for the largest layer, held once")))
