"""Check that the configured device exists and can compute in the configured dtype."""

from __future__ import annotations

import warnings

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DtypeFallbackWarning(UserWarning):
    pass


def check_device(device: str, field: str = "model.device") -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{field}: '{device}' requested but this torch sees no CUDA device "
                         f"(torch {torch.__version__}); use device: cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"{field}: '{device}' but only {torch.cuda.device_count()} GPU(s)")
    return dev


def native_support(dev: torch.device, dtype: torch.dtype) -> bool:
    """True when `dev` computes in `dtype` in hardware (not emulated through fp32)."""
    if dtype == torch.float32:
        return True
    if dev.type == "cuda":
        return dtype == torch.float16 or torch.cuda.is_bf16_supported()
    if dev.type == "cpu" and dtype == torch.bfloat16:
        try:  # oneDNN knows whether the CPU has AVX512-BF16 / AMX
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    if dev.type == "cpu" and dtype == torch.float16:
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
        except (AttributeError, RuntimeError):
            return False
    return True  # other backends (mps, xpu): trust the user


def resolve_dtype(name: str, device: str, strict: bool = False,
                  field: str = "model.dtype") -> torch.dtype:
    """`name` as a torch dtype, or float32 with a warning where the device lacks it."""
    if name not in DTYPES:
        raise ValueError(f"{field}: unknown dtype '{name}', expected one of {sorted(DTYPES)}")
    dtype, dev = DTYPES[name], check_device(device)
    if native_support(dev, dtype):
        return dtype
    msg = f"{field}: {name} is not supported natively on {dev}"
    if strict:
        raise ValueError(msg + " (model.strict_dtype is set; use float32)")
    warnings.warn(msg + "; computing in float32 instead", DtypeFallbackWarning, stacklevel=2)
    return torch.float32
