"""4-bit dequantization as one Triton kernel (`quantization.kernel: triton`).

The PyTorch path (nf4.py) takes about ten ops per call: nibble split, table lookup, block-scale
decode (double quant), broadcast multiply, cast. Here one program decodes `TILE` bytes (2·TILE
values) in registers: both nibbles, the code values, the block's scale — decoded from its 8-bit
code, its group's fp32 scale and the offset when double-quantized — and writes the product in
the output dtype. The arithmetic is the PyTorch path's, in the same order (fp32 products, one
rounding to the output dtype, no fused multiply-add), so both give the same bits.

Triton is imported on first use; with TRITON_INTERPRET=1 (set before the import) the kernel runs
on CPU tensors, which is how the tests check it without a GPU.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch

from loratune.quant.codebooks import code_4bit, dynamic_map
from loratune.quant.nf4 import Quantized4bit

TILE = 1024  # bytes per program
DQ_GROUP = 256  # block scales per fp32 scale in double quantization (bitsandbytes' value)


@lru_cache(maxsize=None)
def _kernel():
    # Imported on first use: triton reads TRITON_INTERPRET when the kernel is defined.
    from loratune.quant.nf4_triton_kernels import dequant_4bit

    return dequant_4bit


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def dequantize_4bit_triton(q: Quantized4bit, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The full-precision tensor of `q`, bit-equal to `nf4.dequantize_4bit(q, dtype)`."""
    if q.blocksize % 2:
        raise ValueError(f"blocksize {q.blocksize}: the kernel needs an even block size")
    n = 1
    for d in q.shape:
        n *= d
    dev = q.packed.device
    out = torch.empty(n, dtype=dtype, device=dev)
    code = code_4bit(q.quant_type).to(dev)
    if q.double_quant:
        absmax2, offset, dmap = q.absmax2, q.offset.reshape(1), dynamic_map().to(dev)
    else:  # unused by the kernel, but every pointer argument needs a tensor
        absmax2, offset, dmap = q.absmax, q.absmax, code
    grid = (-(-((n + 1) // 2) // TILE),)
    # No fused multiply-add: the PyTorch path rounds the product before adding the offset.
    options = {} if interpreting() else {"enable_fp_fusion": False}
    bf16 = dtype == torch.bfloat16
    _kernel()[grid](q.packed, q.absmax, absmax2, offset, code, dmap,
                    out.view(torch.int16) if bf16 else out, n, BLOCKSIZE=q.blocksize,
                    DOUBLE=q.double_quant, BF16=bf16, TILE=TILE, **options)
    return out.view(q.shape)
