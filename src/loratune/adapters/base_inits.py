"""LoRA initialisations: the record of each (`InitSpec`, registered by the init's own file:
this one for PiSSA and OLoRA, loftq.py, eva.py), and those that move a rank-r part of the base
weight into the adapter.

    W = W' + s·B0·A0      (s = the adapter's scale; the model's output is unchanged at step 0)

PiSSA takes B0·A0 from W's r principal singular directions, OLoRA from the first r columns of
its QR factorization (here); LoftQ (loftq.py) makes W' an NF4-quantized residual. The base layer
is changed in place, as PEFT does, and must be a full-precision nn.Linear.

The starting B0, A0 are kept beside the adapter (buffers), so that a saved file is a plain LoRA
for the *unchanged* base, as PEFT's `save_pretrained(path_initial_model_for_weight_conversion=)`
writes it:  W' + s·B·A = W + s·(B·A − B0·A0) = W + s·[B | −B0]·[A ; A0]  (rank 2r, alpha doubled).
For LoftQ W − W' is a quantization error, not s·B0·A0: its file applies to the quantized base.

A folder PEFT saved without that conversion (init_lora_weights still pissa/olora/loftq) is loaded
as PEFT loads it: the init runs again on the given base, then the file's A and B are copied in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from loratune.adapters.lora_product import REFERENCE
from loratune.adapters.registry import AdapterError, TrainingHooks

# (W in fp32 [out, in], r, scale, config) -> (A [r, in], B [out, r], the new base weight)
BaseInit = Callable[[torch.Tensor, int, float, object], tuple[torch.Tensor, torch.Tensor,
                                                               torch.Tensor]]
CHANGED_BY = "loratune_base_init"  # attribute a changed base layer carries: the init's name


@dataclass(frozen=True)
class InitSpec:
    """Everything outside an init's own file that `init_lora_weights: <name>` changes: LoRA's
    record (adapters/lora.py) asks these for its files, its training hooks and its loading."""

    name: str
    # Runs on the base weight when the adapter is placed (PiSSA, OLoRA, LoftQ); such an init
    # also runs again when a file that still names it is loaded, as in PEFT.
    from_base: BaseInit | None = None
    # False: W − W' is not s·B0·A0, so a file cannot be rewritten for the unchanged base; it
    # keeps the init's name (LoftQ).
    converts_on_save: bool = True
    # (model, adapter name, config) -> its own adapter_config.json fields; `unused_fields`: what
    # PEFT writes for them when another init runs (LoftQ: loftq_config {}, EVA: eva_config null).
    peft_fields: Callable[[nn.Module, str, object], dict] | None = None
    unused_fields: dict = field(default_factory=dict)
    # (model, config, name, total_steps) -> TrainingHooks: an init fitted to the run's own
    # training batches before the first step (EVA: hooks.before_training).
    hooks: Callable | None = None


_INITS: dict[str, InitSpec] = {}


def register_init(spec: InitSpec) -> None:
    _INITS[spec.name] = spec


def init_spec(name) -> InitSpec | None:
    """What `init_lora_weights: name` is; None for True/gaussian (the layer's own reset)."""
    if isinstance(name, str) and name.startswith("pissa_niter_"):
        return _INITS["pissa"]
    return _INITS.get(name) if isinstance(name, str) else None


def base_init(name) -> BaseInit | None:
    """The init `init_lora_weights: name` runs on the base weight; None when it runs none."""
    spec = init_spec(name)
    return spec.from_base if spec else None


def init_on_load(name):
    """init_lora_weights as a loaded file's config keeps it: an init that changed the base
    reruns on load (the file's A, B apply to the changed base); any other only mattered before
    training (EVA, CorDA, ...), so True. A PEFT folder saved right after a randomized PiSSA
    init (pissa_niter_K, not converted) applies to a residual base that cannot be rebuilt:
    refused (pissa and olora are rebuilt)."""
    if isinstance(name, str) and niter(name) is not None:
        raise AdapterError(
            f"init_lora_weights is {name!r}: the adapter applies to a base from which a "
            "randomized SVD removed a part, which cannot be rebuilt. Save it from PEFT with "
            "save_pretrained(path_initial_model_for_weight_conversion=...) (a plain LoRA), or "
            "train it here: loratune saves such adapters converted")
    return name if name in (None, True, "gaussian") or base_init(name) is not None else True


def init_peft_fields(model: nn.Module, name: str, config) -> dict:
    """The inits' adapter_config.json fields: each one's unused value, then the running one's."""
    fields = {k: v for spec in _INITS.values() for k, v in spec.unused_fields.items()}
    spec = init_spec(config.init_lora_weights)
    if spec is not None and spec.peft_fields is not None:
        fields.update(spec.peft_fields(model, name, config))
    return fields


def init_hooks(model: nn.Module, config, name: str, total_steps: int) -> TrainingHooks:
    """The training hooks of the adapter's init (EVA fits itself to the first batches)."""
    spec = init_spec(config.init_lora_weights)
    if spec is None or spec.hooks is None:
        return TrainingHooks()
    return spec.hooks(model, config, name, total_steps)


def niter(name: str) -> int | None:
    """K of pissa_niter_K; None for the exact SVD. A ValueError naming the field when K is not
    an integer 1-99 (the config's bound: a file may reach here before the config class)."""
    if not name.startswith("pissa_niter_"):
        return None
    k = name.removeprefix("pissa_niter_")
    if not (k.isdecimal() and k.isascii() and 1 <= int(k) <= 99):
        raise ValueError(f"init_lora_weights: {name!r} is not pissa_niter_K with K an "
                         "integer 1-99")
    return int(k)


def pissa(w: torch.Tensor, r: int, scale: float, config) -> tuple[torch.Tensor, ...]:
    """A = √(S_r/s)·V_rᵀ, B = U_r·√(S_r/s): s·B·A is W's best rank-r approximation."""
    k = niter(config.init_lora_weights)
    if k is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:  # randomized: k power iterations on a random start (the global torch RNG)
        u, s, v = torch.svd_lowrank(w, q=r, niter=k)
        vh = v.t()
    root = torch.sqrt(s / scale)
    a, b = root[:, None] * vh, u * root[None, :]
    return a, b, w - scale * (b @ a)


def olora(w: torch.Tensor, r: int, scale: float, config) -> tuple[torch.Tensor, ...]:
    """W = Q·R: B = Q's first r columns (orthonormal), A = R's first r rows."""
    q, rr = torch.linalg.qr(w)
    a, b = rr[:r].contiguous(), q[:, :r].contiguous()
    return a, b, w - scale * (b @ a)


register_init(InitSpec("pissa", from_base=pissa))
register_init(InitSpec("olora", from_base=olora))


def start_from_base(adapter: nn.Module, base: nn.Module) -> None:
    """Run the adapter's init on `base`: fill A and B, keep them as A0/B0, change the base."""
    name = adapter.config.init_lora_weights
    if not isinstance(base, nn.Linear):
        raise AdapterError(
            f"init_lora_weights={name!r} rewrites the base weight and needs a full-precision "
            f"linear layer, not a {type(base).__name__}: load the model unquantized (without "
            "model.quantization); loftq quantizes the residual itself")
    if getattr(base, CHANGED_BY, None):
        raise AdapterError(
            f"init_lora_weights={name!r}: this layer's base weight was already changed by "
            f"another adapter's {getattr(base, CHANGED_BY)!r} init; give each such adapter a "
            "model of its own (or save the first one, which saves as a plain LoRA, and reload)")
    with torch.no_grad():
        w = base.weight.detach().float()
        a, b, new_base = base_init(name)(w, adapter.r, adapter.scaling, adapter.config)
        adapter.lora_A.copy_(a)
        adapter.lora_B.copy_(b)
        base.weight.copy_(new_base.to(base.weight.dtype))
    adapter.register_buffer("lora_A_init", adapter.lora_A.detach().clone(), persistent=False)
    adapter.register_buffer("lora_B_init", adapter.lora_B.detach().clone(), persistent=False)
    setattr(base, CHANGED_BY, name)


def add_starting_update(adapter: nn.Module, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """out + s·x·A0ᵀ·B0ᵀ: with the adapters disabled (a DPO/GRPO reference, an eval's base) the
    changed base W' gives back the model training started from, W' + s·B0·A0: for PiSSA and
    OLoRA the original W, for LoftQ NF4 values plus the fitted error (the original W is not
    kept: holding W − W' would cost a full-size matrix per layer)."""
    a0 = getattr(adapter, "lora_A_init", None)
    if a0 is None:
        return out
    return REFERENCE.expand_add(out, REFERENCE.shrink(x, a0), adapter.lora_B_init,
                                adapter.scaling)


def converts_on_save(adapter: nn.Module) -> bool:
    """Whether the adapter's file is rewritten as a plain LoRA for the unchanged base."""
    return getattr(adapter, "lora_A_init", None) is not None and config_converts_on_save(
        adapter.config)


def config_converts_on_save(config) -> bool:
    spec = init_spec(config.init_lora_weights)
    return spec is not None and spec.from_base is not None and spec.converts_on_save


def plain_lora_tensors(adapter: nn.Module) -> dict[str, torch.Tensor]:
    """[A ; A0] and [B | −B0]: the adapter's update on the unchanged base, as a LoRA of rank 2r."""
    return {"lora_A.weight": torch.cat([adapter.lora_A, adapter.lora_A_init], dim=0),
            "lora_B.weight": torch.cat([adapter.lora_B, -adapter.lora_B_init], dim=1)}


def plain_lora_fields(fields: dict, use_rslora: bool) -> dict:
    """adapter_config.json of `plain_lora_tensors`: ranks doubled, alphas scaled so every
    module's scale stays the same (alpha/r: ×2; rsLoRA's alpha/√r: ×√2)."""
    grow = math.sqrt(2) if use_rslora else 2
    return {**fields, "init_lora_weights": True, "r": 2 * fields["r"],
            "lora_alpha": grow * fields["lora_alpha"],
            "rank_pattern": {k: 2 * v for k, v in fields["rank_pattern"].items()},
            "alpha_pattern": {k: grow * v for k, v in fields["alpha_pattern"].items()}}
