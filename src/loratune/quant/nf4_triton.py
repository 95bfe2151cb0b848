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


FEW_ROWS = 16  # rows of x up to which `matmul_4bit_triton` reads the weight in 4 bits


@lru_cache(maxsize=None)
def _kernels():
    # Imported on first use: triton reads TRITON_INTERPRET when a kernel is defined.
    from loratune.quant import nf4_triton_kernels

    return nf4_triton_kernels


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
    out = torch.empty(n, dtype=dtype, device=q.packed.device)
    grid = (-(-((n + 1) // 2) // TILE),)
    bf16 = dtype == torch.bfloat16
    _kernels().dequant_4bit[grid](*_scale_args(q), out.view(torch.int16) if bf16 else out, n,
                                  BLOCKSIZE=q.blocksize, DOUBLE=q.double_quant, BF16=bf16,
                                  TILE=TILE, **_options())
    return out.view(q.shape)


def _scale_args(q: Quantized4bit) -> tuple[torch.Tensor, ...]:
    """packed, absmax, absmax2, offset, code table, dynamic map: the kernels' first arguments."""
    dev = q.packed.device
    code = code_4bit(q.quant_type).to(dev)
    if q.double_quant:
        return q.packed, q.absmax, q.absmax2, q.offset.reshape(1), code, dynamic_map().to(dev)
    # unused by the kernels, but every pointer argument needs a tensor
    return q.packed, q.absmax, q.absmax, q.absmax, code, code


def _options() -> dict:
    # No fused multiply-add: the PyTorch path rounds the product before adding the offset.
    return {} if interpreting() else {"enable_fp_fusion": False}


def matmul_4bit_triton(x: torch.Tensor, q: Quantized4bit) -> torch.Tensor:
    """x · Wᵀ for W = `q`, in x's dtype. Up to FEW_ROWS rows of x (decoding), one kernel reads
    the 4-bit weight tile by tile; more rows dequantize W once (kernel above) and multiply."""
    rows = x.numel() // x.shape[-1]
    if rows > FEW_ROWS or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return torch.nn.functional.linear(x, dequantize_4bit_triton(q, x.dtype))
    n_out, k = q.shape
    x2 = x.reshape(rows, k).contiguous()
    out = torch.empty(rows, n_out, dtype=x.dtype, device=x.device)
    bf16 = x.dtype == torch.bfloat16
    block_n = 64
    _kernels().matmul_4bit_few[(-(-n_out // block_n),)](
        x2, *_scale_args(q), out.view(torch.int16) if bf16 else out, rows, n_out, k,
        BLOCKSIZE=q.blocksize, DOUBLE=q.double_quant, BF16=bf16, FP32=x.dtype == torch.float32,
        BLOCK_M=FEW_ROWS, BLOCK_N=block_n, BLOCK_K=64, **_options())
    return out.view(*x.shape[:-1], n_out)
