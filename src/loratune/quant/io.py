"""4-bit checkpoints in the layout transformers + bitsandbytes save (`load_in_4bit`).

Per quantized linear `P`: `P.weight` (packed uint8, [n/2, 1]), `P.weight.absmax`,
`P.weight.quant_map`, with double quant `P.weight.nested_absmax` / `nested_quant_map`, and
`P.weight.quant_state.bitsandbytes__nf4` (a JSON dict stored as uint8 bytes: blocksize, shape,
dtype, nested offset...). Our packed bytes are bitsandbytes' own, so such a folder is a
checkpoint either library loads, and quantizing a 7B model once is enough.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from loratune.config import QuantConfig
from loratune.quant.codebooks import code_4bit, dynamic_map
from loratune.quant.linear4bit import Linear4bit
from loratune.quant.nf4 import Quantized4bit

STATE_KEY = "quant_state.bitsandbytes__"


def bnb_quant_config(config: dict) -> QuantConfig | None:
    """Our QuantConfig for a config.json saved with bitsandbytes 4-bit weights, else None."""
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != "bitsandbytes":
        return None
    if not qc.get("load_in_4bit", qc.get("_load_in_4bit")):
        raise ValueError("8-bit (LLM.int8) bitsandbytes checkpoints are not supported; "
                         "only load_in_4bit ones")
    return QuantConfig(type=qc.get("bnb_4bit_quant_type", "nf4"),
                       double_quant=bool(qc.get("bnb_4bit_use_double_quant", False)),
                       compute_dtype=qc.get("bnb_4bit_compute_dtype") or "float32")


def linear_tensors(prefix: str, layer: Linear4bit) -> dict[str, torch.Tensor]:
    q = layer.quantized()
    meta = {"quant_type": q.quant_type, "blocksize": q.blocksize, "dtype": "float32",
            "shape": list(q.shape)}
    out = {f"{prefix}.weight": q.packed.reshape(-1, 1),
           f"{prefix}.weight.absmax": q.absmax,
           f"{prefix}.weight.quant_map": code_4bit(q.quant_type).clone()}
    if q.double_quant:
        meta.update(nested_blocksize=256, nested_dtype="float32", nested_offset=q.offset.item())
        out[f"{prefix}.weight.nested_absmax"] = q.absmax2
        out[f"{prefix}.weight.nested_quant_map"] = dynamic_map().clone()
    raw = json.dumps(meta).encode("utf-8")
    out[f"{prefix}.weight.{STATE_KEY}{q.quant_type}"] = torch.tensor(list(raw), dtype=torch.uint8)
    if layer.bias is not None:
        out[f"{prefix}.bias"] = layer.bias.detach()
    return out


def quantized_linear(prefix: str, read, expected: tuple[int, int], compute_dtype,
                     bias: torch.Tensor | None, kernel: str = "auto") -> Linear4bit:
    """Build one Linear4bit from its stored parts; `read(key)` returns a tensor or None."""
    state = None
    for kind in ("nf4", "fp4"):
        state = read(f"{prefix}.weight.{STATE_KEY}{kind}")
        if state is not None:
            break
    meta = json.loads(bytes(state.tolist()).decode("utf-8"))
    shape = tuple(meta["shape"])
    if shape != expected:
        raise ValueError(f"{prefix}: the 4-bit checkpoint holds a {shape[0]}x{shape[1]} weight "
                         f"but the model expects {expected[0]}x{expected[1]} (another model "
                         f"shape?)")
    nested = "nested_offset" in meta
    q = Quantized4bit(read(f"{prefix}.weight").reshape(-1), shape, int(meta["blocksize"]),
                      meta["quant_type"], read(f"{prefix}.weight.absmax"),
                      torch.tensor(float(meta["nested_offset"])) if nested else None,
                      read(f"{prefix}.weight.nested_absmax") if nested else None)
    if nested and int(meta.get("nested_blocksize", 256)) != 256:
        raise ValueError(f"{prefix}: nested block size {meta['nested_blocksize']}, expected 256")
    return Linear4bit(q, bias, compute_dtype, kernel)


def save_quantized(model: nn.Module, folder: str | Path, overwrite: bool = False) -> Path:
    """Write a 4-bit model as a transformers/bitsandbytes folder (atomically)."""
    from loratune.files import write_atomic_dir

    layers = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    if not layers:
        raise ValueError("the model has no 4-bit layers to save")
    first = next(iter(layers.values()))
    tensors: dict[str, torch.Tensor] = {}
    skip = {f"{n}.{b}" for n in layers for b in ("packed", "absmax", "offset", "absmax2", "bias")}
    for name, tensor in model.state_dict().items():
        if name not in skip:
            tensors[name] = tensor
    for name, layer in layers.items():
        tensors.update(linear_tensors(name, layer))
    # tied embeddings share storage: safetensors stores each tensor once
    out_emb = model.get_output_embeddings()
    if getattr(model.config, "tie_word_embeddings", False) and out_emb is not None:
        tensors = {k: v for k, v in tensors.items() if not k.endswith("lm_head.weight")}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    config = model.config.to_dict()
    config["quantization_config"] = {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
        "bnb_4bit_quant_type": first.quant_type,
        "bnb_4bit_use_double_quant": first.offset is not None,
        "bnb_4bit_compute_dtype": str(first.compute_dtype).removeprefix("torch."),
        "bnb_4bit_quant_storage": "uint8"}

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))

    return write_atomic_dir(Path(folder), fill, overwrite, marker="config.json")
