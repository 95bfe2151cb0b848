"""Hosts: the modules that hold named adapters, and the contract of a layer-level adapter.

A host sits at a module path of an unmodified transformers model and holds adapters by name
(`.adapters`), which of them run and with what weight (`.active`), and a `.disabled` switch;
`unwrap()` gives back what it replaced. `AdaptedLinear` hosts the layer-level methods (LoRA,
DoRA, IA³, MoE-LoRA, AdaLoRA) around a frozen linear layer; prompt, prefix and bottleneck
adapters bring hosts of their own. `SavedModule` holds PEFT's `modules_to_save` copies.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import nn

from loratune.adapters.peft_format import file_key


def adapter_dtype(config, base_dtype: torch.dtype) -> torch.dtype:
    """The dtype adapter weights train in beside a base in `base_dtype`: fp32 unless the config
    says `dtype: base`. AdamW's step on a bf16 weight near 1 (an IA³ scale) is below bf16's
    resolution there and rounds away; fp32 weights keep it, and the adapters cast at their
    boundary (input to their dtype, output back to the base's)."""
    if getattr(config, "dtype", "float32") == "base":
        return base_dtype
    return torch.float32


def module_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype of a module's first floating-point parameter (None when it has none)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)


def _cast_floats(value, dtype: torch.dtype | None):
    if dtype is not None and isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    return value


class LayerAdapter(nn.Module):
    """One adapter of a layer-level method on one linear layer: what `AdaptedLinear` calls.

    A method implements `add_to` and `file_tensors` (and `merge_into`/`unmerge_from` when it
    can be merged); the other hooks default to doing nothing.
    """

    def add_to(self, out: torch.Tensor, x: torch.Tensor, weight: float = 1.0,
               base: nn.Module | None = None, base_out: torch.Tensor | None = None
               ) -> torch.Tensor:
        """`out` (the base layer's output, plus earlier adapters') with this adapter's update on
        input `x`, times `weight`; `base_out` is the base layer's own output."""
        raise NotImplementedError

    def fused_forward(self, base: nn.Module, x: torch.Tensor, weight: float = 1.0
                      ) -> torch.Tensor | None:
        """base(x) with this adapter's update in one op (`train.fused_lora`), when the adapter
        is the layer's only running one; None: no fused path, the host runs the plain one."""
        return None

    def scale_input(self, x: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        """The base layer's input after this adapter (IA³ scales a feed-forward layer's input)."""
        return x

    def merge_into(self, w: torch.Tensor, bias: torch.Tensor | None, weight: float):
        """(W, b) in fp32 with weight·(this adapter) folded in."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged")

    def unmerge_from(self, w: torch.Tensor, bias: torch.Tensor | None, weight: float):
        """The inverse of `merge_into`."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged")

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """The live tensors, by the kind (key ending) the adapter file uses."""
        raise NotImplementedError

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """What a saved file holds (AdaLoRA: only its kept ranks); by default the live tensors."""
        return self.file_tensors()

    def restrict_outputs(self, rows: list[int], parts: list[str]) -> None:
        """Adapt only these output rows (the named `parts` of a fused layer); methods whose
        record has `slices_outputs` implement it."""
        raise NotImplementedError(f"{type(self).__name__} adapts whole layers only")

    def init_from_base(self, base: nn.Module) -> None:
        """Called once the adapter is placed on `base` (DoRA starts its magnitudes from it)."""

    def undo_base_change(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """With the adapters disabled: `out`, the base layer's output on `x`, as the base gave
        it before this adapter's init moved a part of its weight into the adapter (PiSSA,
        OLoRA, LoftQ: adapters/base_inits.py); by default `out` unchanged."""
        return out

    def fit_file(self, path: str, tensors: dict[str, torch.Tensor], raw: dict) -> None:
        """Reshape to a file's `tensors` (by kind) before they are copied in; `raw` is its
        adapter_config.json (AdaLoRA: a file may hold only the kept ranks)."""

    def fit_folder(self, folder, shapes: dict[str, tuple[int, ...]]) -> None:
        """Called when the adapter is built alone from an adapter folder (the streaming merge),
        after `fit_file`: `folder` (a PeftFolder: config, raw, every tensor) and the base's
        (out, in) shape of each layer the folder targets give what its layers share inside a
        model (VeRA's projections, drawn at the size of the largest layer)."""


class AdapterHost(nn.Module):
    """Holds named adapters at one module path; `base_layer` is the module it wraps, if any."""

    def __init__(self, base_layer: nn.Module | None = None):
        super().__init__()
        if base_layer is not None:
            self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active: dict[str, float] = {}
        self.disabled = False

    def unwrap(self) -> nn.Module | None:
        """What goes back at this path when the host is removed (None: delete the attribute)."""
        return self._modules.get("base_layer")

    def running(self) -> list[tuple[nn.Module, float]]:
        """(adapter, weight) of the adapters that run now."""
        if self.disabled:
            return []
        return [(self.adapters[n], w) for n, w in self.active.items() if n in self.adapters]

    def file_tensors(self, name: str, path: str) -> dict[str, torch.Tensor]:
        """File key -> live tensor of adapter `name`, the host being at (canonical) `path`."""
        return {file_key(path, k): t for k, t in self.adapters[name].file_tensors().items()}

    def saved_tensors(self, name: str, path: str) -> dict[str, torch.Tensor]:
        """What a saved file holds for adapter `name`; by default its live tensors."""
        return self.file_tensors(name, path)

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}, active={self.active}"


class AdaptedLinear(AdapterHost):
    """A frozen linear layer plus named adapters of the layer-level methods.

    forward = base(x') then each active adapter's `add_to`, where x' is x after every running
    adapter's `scale_input`.
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.merged: dict[str, float] = {}
        self.fused = False  # try the adapter's fused op first (adapters/fused_lora.py)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def saved_tensors(self, name: str, path: str) -> dict[str, torch.Tensor]:
        return {file_key(path, k): t for k, t in self.adapters[name].saved_tensors().items()}

    def running(self) -> list[tuple[LayerAdapter, float]]:
        if self.disabled:
            return []
        return [(self.adapters[n], w) for n, w in self.active.items()
                if n in self.adapters and n not in self.merged]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:  # the base as it was before any adapter's init changed it
            out = self.base_layer(x)
            for ad in self.adapters.values():
                out = ad.undo_base_change(out, x)
            return out
        running = self.running()
        if self.fused and len(running) == 1:
            out = running[0][0].fused_forward(self.base_layer, x, running[0][1])
            if out is not None:
                return out
        x_base = x
        for ad, weight in running:
            x_base = ad.scale_input(x_base, weight)
        out = base_out = self.base_layer(x_base)
        for ad, weight in running:
            out = ad.add_to(out, x, weight, self.base_layer, base_out)
        return out

    def _rewrite_weight(self, name: str, weight: float, undo: bool) -> None:
        if not isinstance(self.base_layer, nn.Linear):
            # Re-rounding a 4-bit weight would change the base; merge into a dequantized copy.
            raise ValueError(f"cannot merge into a {type(self.base_layer).__name__} base in "
                             "place; dequantize the base model first (load it unquantized)")
        ad, layer = self.adapters[name], self.base_layer
        bias = None if layer.bias is None else layer.bias.float()
        step = ad.unmerge_from if undo else ad.merge_into
        with torch.no_grad():
            w, b = step(layer.weight.float(), bias, weight)
            layer.weight.copy_(w.to(layer.weight.dtype))
            if b is not None:
                layer.bias.copy_(b.to(layer.bias.dtype))

    def merge(self, names: dict[str, float] | None = None) -> None:
        for name, weight in (self.active if names is None else names).items():
            if name in self.adapters and name not in self.merged:
                self._rewrite_weight(name, weight, undo=False)
                self.merged[name] = weight

    def unmerge(self) -> None:
        for name, weight in reversed(list(self.merged.items())):
            self._rewrite_weight(name, weight, undo=True)
            del self.merged[name]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, merged={list(self.merged)}"


class SavedModule(nn.Module):
    """`modules_to_save`: a trainable copy of a whole module per adapter, original kept frozen."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original = original
        self.copies = nn.ModuleDict()
        self.active: dict[str, float] = {}
        self.disabled = False

    def add_copy(self, name: str, dtype: torch.dtype | None = None) -> nn.Module:
        """A trainable copy of the original as `name`, its floating weights in `dtype` (None:
        the original's); forward casts at the copy's boundary when the two differ."""
        clone = copy.deepcopy(self.original)
        if dtype is not None:
            clone.to(dtype)  # Module.to(dtype) changes floating-point tensors only
        clone.requires_grad_(True)
        self.copies[name] = clone
        return clone

    def current(self) -> nn.Module:
        if not self.disabled:
            for name in self.active:
                if name in self.copies:
                    return self.copies[name]
        return self.original

    def forward(self, *args, **kwargs):
        mod = self.current()
        inner, outer = module_dtype(mod), module_dtype(self.original)
        if inner == outer:
            return mod(*args, **kwargs)
        # An fp32 copy on a low-precision base: floating inputs in, the output back out.
        args = [_cast_floats(a, inner) for a in args]
        kwargs = {k: _cast_floats(v, inner) for k, v in kwargs.items()}
        return _cast_floats(mod(*args, **kwargs), outer)

    def __getattr__(self, item):
        # Model code reads attributes such as `lm_head.weight`; answer for the module in use.
        try:
            return super().__getattr__(item)
        except AttributeError:
            return getattr(self.current(), item)


def hosts(model: nn.Module) -> Iterator[tuple[str, AdapterHost]]:
    for name, mod in model.named_modules():
        if isinstance(mod, AdapterHost):
            yield name, mod


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLinear]]:
    for name, mod in model.named_modules():
        if isinstance(mod, AdaptedLinear):
            yield name, mod


def saved_modules(model: nn.Module) -> Iterator[tuple[str, SavedModule]]:
    for name, mod in model.named_modules():
        if isinstance(mod, SavedModule):
            yield name, mod


def leaf_names(model: nn.Module, name: str, target: list[str] | str) -> list[str] | str:
    """target_modules as a file states it: a regex string as given, else the leaf names of the
    layers adapter `name` sits on."""
    if isinstance(target, str) and target != "all-linear":
        return target  # a regex keeps its exact meaning
    # Paths as the plain model has them (PEFT loads onto it): a host's base_layer step dropped,
    # e.g. a LoRA inside a bottleneck host on the mlp.
    paths = sorted(p.replace(".base_layer", "") for p, l in adapted_layers(model)
                   if name in l.adapters)
    leaves = {p.rsplit(".", 1)[-1] for p in paths}
    # A leaf name takes every module so named: when the adapter sits on only some (a vision
    # tower's gate_proj, not the language model's), the file names the layers' paths.
    inside = (".adapters.", ".copies.", ".original")
    named = {n.replace(".base_layer", "") for n, _ in model.named_modules()
             if n.rsplit(".", 1)[-1] in leaves and not any(s in n for s in inside)}
    return sorted(leaves) if named == set(paths) else paths
