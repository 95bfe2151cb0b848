"""LoRA initialisations that move a rank-r part of the base weight into the adapter.

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

import torch
from torch import nn

from loratune.adapters.lora_product import REFERENCE
from loratune.adapters.registry import AdapterError

# (W in fp32 [out, in], r, scale, config) -> (A [r, in], B [out, r], the new base weight)
BaseInit = Callable[[torch.Tensor, int, float, object], tuple[torch.Tensor, torch.Tensor,
                                                               torch.Tensor]]
_INITS: dict[str, BaseInit] = {}
_KEEPS_BASE_ON_SAVE: set[str] = set()  # inits whose files apply to the changed base (LoftQ)
CHANGED_BY = "loratune_base_init"  # attribute a changed base layer carries: the init's name


def register_base_init(name: str, init: BaseInit, converts_on_save: bool = True) -> None:
    """`converts_on_save=False`: W − W' is not s·B0·A0, so a file cannot be rewritten for the
    unchanged base; it keeps the init's name and loading reruns the init (as PEFT does)."""
    _INITS[name] = init
    if not converts_on_save:
        _KEEPS_BASE_ON_SAVE.add(name)


def base_init(name) -> BaseInit | None:
    """The init `init_lora_weights: name` runs on the base weight; None for True/gaussian."""
    if isinstance(name, str) and name.startswith("pissa_niter_"):
        return _INITS["pissa"]
    return _INITS.get(name) if isinstance(name, str) else None


def niter(name: str) -> int | None:
    """K of pissa_niter_K; None for the exact SVD."""
    return int(name.rsplit("_", 1)[1]) if name.startswith("pissa_niter_") else None


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


register_base_init("pissa", pissa)
register_base_init("olora", olora)


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
    name = adapter.config.init_lora_weights
    return getattr(adapter, "lora_A_init", None) is not None and name not in _KEEPS_BASE_ON_SAVE


def config_converts_on_save(config) -> bool:
    name = config.init_lora_weights
    return base_init(name) is not None and name not in _KEEPS_BASE_ON_SAVE


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
