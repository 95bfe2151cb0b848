"""Bottleneck adapters (Houlsby et al. 2019): h + up(act(down(h))) on a sublayer's output.

A `BottleneckHost` wraps a decoder layer's `self_attn` and/or `mlp` and adds its active adapters
to the wrapped module's output, before the layer's own residual add (as in the paper). Placement
"houlsby" wraps both sublayers of every decoder layer, "pfeiffer" only the MLP. The file format
is our own (PEFT has no such method): see docs/bottleneck-format.md.
"""

from __future__ import annotations

import torch
from torch import nn

from loratune.adapters.host import AdapterHost, adapter_dtype
from loratune.adapters.peft_format import ANOTHER_BASE, PeftFolder, file_key
from loratune.adapters.registry import (AdapterError, FileSpec, MergeSpec, MethodRecord, RowBlock,
                                        ServingSpec, register)
from loratune.config import BottleneckConfig
from loratune.models.modules import set_submodule

PEFT_TYPE = "LORATUNE_BOTTLENECK"
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class BottleneckAdapter(nn.Module):
    """down [b, hidden] → nonlinearity → up [hidden, b] → dropout; up starts at zero."""

    def __init__(self, hidden_size: int, config: BottleneckConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        kw = {"device": device, "dtype": dtype}
        self.adapter_down = nn.Linear(hidden_size, config.bottleneck_size, **kw)
        self.act = ACTIVATIONS[config.nonlinearity]()
        self.adapter_up = nn.Linear(config.bottleneck_size, hidden_size, **kw)
        # Dropout on the adapter's output, as adapter-transformers does: the residual path stays.
        self.dropout = nn.Dropout(config.dropout)
        # A zero up-projection makes a fresh adapter add exactly nothing, so training starts
        # from the base model; the down-projection keeps nn.Linear's init so gradients flow.
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        """up(act(down(h))), computed in the adapter's dtype and returned in h's dtype."""
        x = h.to(self.adapter_down.weight.dtype)
        return self.dropout(self.adapter_up(self.act(self.adapter_down(x)))).to(h.dtype)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.delta(h)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """Live tensors by their key suffix in adapter_model.safetensors."""
        return {"adapter_down.weight": self.adapter_down.weight,
                "adapter_down.bias": self.adapter_down.bias,
                "adapter_up.weight": self.adapter_up.weight,
                "adapter_up.bias": self.adapter_up.bias}


class BottleneckHost(AdapterHost):
    """Wraps a sublayer; output h becomes h + Σ weight·delta(h) over the active adapters.

    Every delta is computed from the same h (the wrapped module's output), so weighted adapters
    act in parallel, not stacked. For a tuple output (attention: (hidden, weights)) only the
    first element is changed.
    """

    def forward(self, *args, **kwargs):
        out = self.base_layer(*args, **kwargs)
        running = self.running()
        if not running:
            return out
        h = out[0] if isinstance(out, tuple) else out
        new = h
        for adapter, weight in running:
            delta = adapter.delta(h)
            new = new + (delta if weight == 1.0 else weight * delta)
        return (new, *out[1:]) if isinstance(out, tuple) else new

    def __getattr__(self, item):
        # Model code reads attributes of the wrapped module (e.g. `self_attn.layer_idx`).
        try:
            return super().__getattr__(item)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if "base_layer" not in modules:
                raise
            return getattr(modules["base_layer"], item)


def decoder_layer_paths(model: nn.Module) -> list[str]:
    """Dotted paths of the decoder layers (model.get_decoder().layers), in order."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not all(
            hasattr(layer, "self_attn") and hasattr(layer, "mlp") for layer in layers):
        raise AdapterError(
            f"bottleneck adapters need decoder layers with .self_attn and .mlp at "
            f"model.get_decoder().layers; {type(model).__name__} has none")
    where = {id(m): p for p, m in model.named_modules()}
    prefix = where[id(layers)]
    return [f"{prefix}.{i}" if prefix else str(i) for i in range(len(layers))]


def bottleneck_paths(model: nn.Module, placement: str) -> list[str]:
    """Paths of the sublayers a placement wraps: houlsby → self_attn and mlp, pfeiffer → mlp."""
    parts = {"houlsby": ("self_attn", "mlp"), "pfeiffer": ("mlp",)}
    if placement not in parts:
        raise AdapterError(f"bottleneck placement {placement!r}: expected houlsby or pfeiffer")
    return [f"{layer}.{part}" for layer in decoder_layer_paths(model) for part in parts[placement]]


def _hidden_placement(model: nn.Module) -> tuple[int, torch.device, torch.dtype]:
    """Hidden size plus the device/dtype of the hidden states (those of the input embeddings)."""
    emb = model.get_input_embeddings()
    cfg = getattr(model, "config", None)
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    hidden = getattr(text_cfg, "hidden_size", None) or emb.weight.shape[-1]
    return hidden, emb.weight.device, emb.weight.dtype


def attach_bottleneck(model: nn.Module, config: BottleneckConfig, name: str,
                      tokenizer=None) -> None:
    """Add adapter `name` at every sublayer `config.placement` names; it becomes their active one.

    Existing hosts receive the new adapter beside their others. `tokenizer` is unused (the
    signature is shared with the other model-level methods).
    """
    paths = bottleneck_paths(model, config.placement)  # first: its error names the model
    hidden, device, dtype = _hidden_placement(model)
    for path in paths:
        host = model.get_submodule(path)
        if not isinstance(host, BottleneckHost):
            host = BottleneckHost(host)
            set_submodule(model, path, host)
        if name in host.adapters:
            raise AdapterError(f"{path} already holds a bottleneck adapter named '{name}'")
        host.adapters[name] = BottleneckAdapter(hidden, config, device=device,
                                                dtype=adapter_dtype(config, dtype))
        host.active = {name: 1.0}


def bottleneck_config(config: BottleneckConfig) -> dict:
    """adapter_config.json content: our peft_type, the task type and the config's fields."""
    return {"peft_type": PEFT_TYPE, "task_type": "CAUSAL_LM",
            **config.model_dump(exclude={"method", "dtype"})}


class ServedBottleneck(BottleneckAdapter):
    """A block as the server runs it for the rows that use it (registry.RowBlock): the delta
    alone, on the sublayer's output."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.delta(h)


def bottleneck_blocks(adapter: PeftFolder, model: nn.Module) -> dict[str, RowBlock]:
    """Per wrapped sublayer of a served model, the file's block in float32."""
    config = adapter.config
    places = set(bottleneck_paths(model, config.placement))
    hidden = _hidden_placement(model)[0]
    blocks = {}
    for path, parts in adapter.modules().items():
        if path not in places:
            raise AdapterError(f"{adapter.weights_path}: {file_key(path, 'adapter_down.weight')} "
                               f"is not at a {config.placement} sublayer of this model "
                               f"({ANOTHER_BASE})")
        block = ServedBottleneck(hidden, config, dtype=torch.float32)
        adapter.copy_module(path, parts, block.file_tensors())
        blocks[path] = RowBlock(block.eval(), reads="output")
    return blocks


register(MethodRecord(
    name="bottleneck", config_class=BottleneckConfig, peft_type=PEFT_TYPE,
    files=FileSpec(("adapter_down.weight", "adapter_down.bias", "adapter_up.weight",
                    "adapter_up.bias"),
                   peft_fields=lambda model, name, config, compact: bottleneck_config(config)),
    attach=attach_bottleneck,
    merge=MergeSpec(why_not="a bottleneck adapter is a nonlinear extra block; no weight change "
                            "equals it"),
    # Served per row as a nonlinear block on each wrapped sublayer's output.
    serving=ServingSpec(blocks=bottleneck_blocks,
                        why_no_composition="a bottleneck block is nonlinear: a weighted sum of "
                                           "blocks is not one block, nor a LoRA product")))
