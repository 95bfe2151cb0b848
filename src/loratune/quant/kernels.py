"""Which code dequantizes (and multiplies by) 4-bit weights: `quantization.kernel` resolved for a
device.

torch: nf4.py, readable, any device. triton: nf4_triton.py, one kernel (CUDA, or CPU under
TRITON_INTERPRET=1). bitsandbytes: its CUDA kernels on our bytes (nf4_bnb.py). auto: on CUDA
the first of bitsandbytes and triton that imports, else torch.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache

import torch
import torch.nn.functional as F

from loratune.quant.nf4 import Quantized4bit, dequantize_4bit
from loratune.quant.nf4_bnb import dequantize_4bit_bnb, matmul_4bit_bnb
from loratune.quant.nf4_triton import dequantize_4bit_triton, interpreting, matmul_4bit_triton

KERNELS = ("auto", "torch", "triton", "bitsandbytes")
_IMPLS = {"torch": dequantize_4bit, "triton": dequantize_4bit_triton,
          "bitsandbytes": dequantize_4bit_bnb}


@lru_cache(maxsize=None)
def importable(package: str) -> bool:
    if importlib.util.find_spec(package) is None:
        return False
    try:
        importlib.import_module(package)
    except Exception:  # installed but broken (e.g. no CUDA library it was built for)
        return False
    return True


def choose_kernel(kernel: str, device: torch.device | str,
                  field: str = "model.quantization.kernel") -> str:
    """The kernel that runs for `kernel` on `device`; an error naming `field` if it cannot."""
    if kernel not in KERNELS:
        raise ValueError(f"{field}: unknown kernel {kernel!r}, expected one of "
                         f"{', '.join(KERNELS)}")
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if kernel == "auto":
        if cuda:
            return next((k for k in ("bitsandbytes", "triton") if importable(k)), "torch")
        return "torch"
    if kernel == "torch":
        return kernel
    if not cuda and not (kernel == "triton" and interpreting()):
        raise ValueError(f"{field}: {kernel} needs a CUDA device, the model is on {dev} "
                         "(use torch or auto)")
    if not importable(kernel):
        raise ValueError(f"{field}: {kernel} is not importable here (pip install {kernel}, "
                         "or use auto)")
    return kernel


def dequantize(q: Quantized4bit, dtype: torch.dtype, kernel: str = "auto") -> torch.Tensor:
    """`q` in full precision (`dtype`) by the kernel `kernel` resolves to on q's device."""
    return _IMPLS[choose_kernel(kernel, q.packed.device)](q, dtype)


def matmul_4bit(x: torch.Tensor, q: Quantized4bit, kernel: str = "auto") -> torch.Tensor:
    """x · Wᵀ in x's dtype, W = `q`. torch dequantizes W and multiplies; triton does so beyond
    16 rows of x and below reads W in 4 bits inside the matmul (decoding); bitsandbytes
    decides itself (its fused GEMM up to ~1.5k rows in 0.50). Dequantizing paths give the same
    bits; fused ones agree to a rounding of the output."""
    chosen = choose_kernel(kernel, q.packed.device)
    if chosen == "triton":
        return matmul_4bit_triton(x, q)
    if chosen == "bitsandbytes":
        return matmul_4bit_bnb(x, q)
    return F.linear(x, dequantize_4bit(q, x.dtype))
