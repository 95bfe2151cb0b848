"""Build 4-bit models without ever holding the full-precision model in memory.

`load_quantized` reads a safetensors checkpoint tensor by tensor and quantizes each linear
weight as it arrives; `random_quantized` builds a random-initialized model of a real
architecture (e.g. Llama-2-7B's shape) layer by layer straight into 4 bits, for benchmarks.
Peak memory is the final 4-bit model plus one full-precision tensor.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from loratune.config import QuantConfig
from loratune.models.device import DTYPES
from loratune.models.modules import set_submodule
from loratune.models.moe_experts import (PROJECTIONS, QuantizedExperts, current_name,
                                         is_fused_experts, per_expert_key)
from loratune.models.mxfp4 import dequantize_mxfp4, is_mxfp4, mxfp4_params
from loratune.models.quantize import prepare_for_kbit_training, unquantized_dtype
from loratune.models.shapes import LLAMA_SHAPES
from loratune.quant.io import STATE_KEY, quantized_linear
from loratune.quant.linear4bit import Linear4bit
from loratune.quant.nf4 import quantize_4bit
from loratune.readers import open_safetensors


def _meta_model(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _skip_paths(model: nn.Module) -> set[str]:
    out = model.get_output_embeddings()
    return {n for n, m in model.named_modules() if m is out}


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    path, _, name = key.rpartition(".")
    module = model.get_submodule(path) if path else model
    if name in module._buffers:
        module._buffers[name] = value
    else:
        module._parameters[name] = nn.Parameter(value, requires_grad=False)


def _experts_shell(model: nn.Module, path: str, cfg: QuantConfig) -> QuantizedExperts:
    """The QuantizedExperts at `path`, put in place of the (meta) fused experts on first use."""
    module = model.get_submodule(path)
    if is_fused_experts(module):
        module = QuantizedExperts(module, DTYPES[cfg.compute_dtype])
        set_submodule(model, path, module)
    if not isinstance(module, QuantizedExperts):
        raise ValueError(f"{path}: the checkpoint has routed-expert tensors but the model has a "
                         f"{type(module).__name__} there")
    return module


def _place_expert(model: nn.Module, expert_key: tuple[str, int, str], tensor: torch.Tensor,
                  pending: dict, cfg: QuantConfig) -> None:
    """Quantize one expert's matrix of a per-expert checkpoint (`expert_key`: per_expert_key's);
    gate and up wait for each other (an expert's gate_up_proj is their rows stacked)."""
    path, expert, part = expert_key
    shell = _experts_shell(model, path, cfg)
    if part == "down_proj":
        weight = tensor
    else:
        halves = pending.setdefault((path, expert), {})
        halves[part] = tensor
        if len(halves) < 2:
            return
        halves = pending.pop((path, expert))
        weight = torch.cat([halves["gate_proj"], halves["up_proj"]])
    projection = "down_proj" if part == "down_proj" else "gate_up_proj"
    shell.put(projection, expert, weight, cfg.blocksize, cfg.type, cfg.double_quant, cfg.kernel)


def _place(model: nn.Module, key: str, tensor: torch.Tensor, skip: set[str], cfg: QuantConfig,
           dtype: torch.dtype) -> None:
    """Quantize a linear weight (or fused experts) as it arrives; store anything else in
    `dtype`."""
    path, _, name = key.rpartition(".")
    module = model.get_submodule(path)
    if name in PROJECTIONS and (is_fused_experts(module) or isinstance(module, QuantizedExperts)):
        _experts_shell(model, path, cfg).load(name, tensor, cfg.blocksize, cfg.type,
                                              cfg.double_quant, cfg.kernel)
    elif isinstance(module, nn.Linear) and name == "weight" and path not in skip:
        bias = module.bias if module.bias is not None and not module.bias.is_meta else None
        q = quantize_4bit(tensor, cfg.blocksize, cfg.type, cfg.double_quant)
        layer = Linear4bit(q, bias, DTYPES[cfg.compute_dtype], cfg.kernel)
        if module.bias is not None and bias is None:
            layer.bias = module.bias  # still meta: its tensor comes later in the file
        set_submodule(model, path, layer)
    else:
        # copy: a tensor read from safetensors may be a view of the mmapped file, and keeping
        # one alive keeps every page of the file that was read resident
        _set_tensor(model, key, tensor.to(dtype, copy=True))


def _compute_buffers(model: nn.Module) -> None:
    """Fill the buffers no checkpoint stores (rotary tables, Gemma's embedding scale) as
    transformers does for a model built on meta: with the model's own `_init_weights`, every
    tensor already read marked initialized so that it is left as read."""
    pending: dict[nn.Module, list[torch.Tensor]] = {}
    for module in model.modules():
        for name, b in module._buffers.items():
            if b is not None and b.is_meta:
                module._buffers[name] = torch.empty_like(b, device="cpu")
                pending.setdefault(module, []).append(module._buffers[name])
    if not pending:
        return
    fresh = {id(t) for ts in pending.values() for t in ts}
    read = [t for t in list(model.parameters()) + list(model.buffers()) if id(t) not in fresh]
    for t in read:
        t._is_hf_initialized = True
    try:
        for module in pending:
            model._init_weights(module)
    finally:
        for t in read:
            del t._is_hf_initialized


def _finish(model: nn.Module, config, dtype: torch.dtype) -> nn.Module:
    """Tie weights, rebuild computed (non-persistent) buffers, check nothing stayed on meta."""
    if getattr(config, "tie_word_embeddings", False):
        # A tied checkpoint stores the shared matrix once, under either name.
        emb, out = model.get_input_embeddings(), model.get_output_embeddings()
        if emb.weight.is_meta:
            emb.weight = out.weight
        else:
            out.weight = emb.weight
    _compute_buffers(model)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if t.is_meta]
    left += [f"{path}.{p}" for path, m in model.named_modules()
             if isinstance(m, QuantizedExperts) for p in m.missing()]
    if left:
        raise ValueError(f"checkpoint has no tensor for {left[0]} ({len(left)} missing)")
    prepare_for_kbit_training(model, dtype)
    return model.eval()


def load_quantized(folder: str | Path, cfg: QuantConfig, dtype: torch.dtype | None = None):
    """A 4-bit model from a safetensors folder, one tensor in full precision at a time.

    What stays unquantized is stored in `dtype` (None: `unquantized_dtype(cfg)`).

    Linear weights already stored in 4 bits (a transformers/bitsandbytes `load_in_4bit`
    checkpoint, or one `save_quantized` wrote) are taken as they are.
    """
    from contextlib import ExitStack

    from transformers import AutoConfig

    folder = Path(folder)
    dtype = unquantized_dtype(cfg) if dtype is None else dtype
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    model = _meta_model(config)
    skip = _skip_paths(model)
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights")
    with ExitStack() as stack:
        files = [stack.enter_context(open_safetensors(s)) for s in shards]
        where = {k: f for f in files for k in f.keys()}

        def read(key: str) -> torch.Tensor | None:
            return where[key].get_tensor(key) if key in where else None

        packed = {k.split(".weight." + STATE_KEY)[0] for k in where if STATE_KEY in k}
        # GPT-OSS as released: MXFP4 experts, decoded here and quantized again to NF4
        mxfp4 = mxfp4_params(where, str(folder)) if is_mxfp4(
            {"quantization_config": getattr(config, "quantization_config", None)}) else {}
        blocks = {b: (param, s) for param, (b, s) in mxfp4.items()}
        read_with_blocks = {s for _, s in mxfp4.values()}
        pending: dict = {}  # an expert's gate or up matrix waiting for the other
        for key in where:
            base, sep, _ = key.partition(".weight.")
            if sep and base in packed:
                continue  # absmax, quant maps, quant_state: read with their weight
            if key in blocks:
                param, scales = blocks[key]
                weight = dequantize_mxfp4(read(key), read(scales), where=f"{folder}: {param}")
                _place(model, current_name(param), weight, skip, cfg, dtype)
            elif key in read_with_blocks:
                continue
            elif key.endswith(".weight") and key[:-7] in packed:
                _place_packed(model, key[:-7], read, cfg)
            elif (expert_key := per_expert_key(key)) is not None:
                _place_expert(model, expert_key, read(key), pending, cfg)
            else:
                _place(model, current_name(key), read(key), skip, cfg, dtype)
    return _finish(model, config, dtype)


def _place_packed(model: nn.Module, path: str, read, cfg: QuantConfig) -> None:
    module = model.get_submodule(path)
    if not isinstance(module, nn.Linear):
        raise ValueError(f"{path}: stored in 4 bits but the model has a "
                         f"{type(module).__name__} there")
    layer = quantized_linear(path, read, (module.out_features, module.in_features),
                             DTYPES[cfg.compute_dtype], None, cfg.kernel)
    if module.bias is not None:
        layer.bias = module.bias  # still meta: its own key fills it
    set_submodule(model, path, layer)


def random_quantized(shape: str | dict, cfg: QuantConfig, dtype: torch.dtype | None = None,
                     seed: int = 0, std: float = 0.02):
    """A random-initialized Llama of a real shape, built straight into 4 bits, layer by layer
    (unquantized weights in `dtype`; None: `unquantized_dtype(cfg)`)."""
    from transformers import LlamaConfig

    dims = LLAMA_SHAPES[shape] if isinstance(shape, str) else shape
    dtype = unquantized_dtype(cfg) if dtype is None else dtype
    config = LlamaConfig(**dims, max_position_embeddings=4096, tie_word_embeddings=False)
    model = _meta_model(config)
    skip = _skip_paths(model)
    gen = torch.Generator().manual_seed(seed)
    for key, tensor in list(model.state_dict(keep_vars=True).items()):
        if key.endswith("norm.weight"):
            value = torch.ones(tensor.shape)
        else:
            value = torch.empty(tensor.shape).normal_(0, std, generator=gen)
        _place(model, key, value, skip, cfg, dtype)
        del value
    return _finish(model, config, dtype)
