"""4-bit dequantization and matmul by bitsandbytes' kernels (`quantization.kernel: bitsandbytes`).

Our stored layout is bitsandbytes' own (packed codes, high nibble first; uint8 block-scale codes,
their fp32 group scales of 256 and the offset), so its `QuantState` is built around the very
buffers a `Linear4bit` holds: nothing is converted or copied, and a weight loaded from a
bitsandbytes checkpoint is used as it was stored.
"""

from __future__ import annotations

import torch

from loratune.quant.codebooks import code_4bit, dynamic_map
from loratune.quant.nf4 import Quantized4bit


def quant_state(q: Quantized4bit, dtype: torch.dtype):
    """A bitsandbytes QuantState over `q`'s own tensors, dequantizing to `dtype`."""
    from bitsandbytes.functional import QuantState

    dev = q.packed.device
    nested = None
    if q.double_quant:
        nested = QuantState(absmax=q.absmax2, code=dynamic_map().to(dev), blocksize=256,
                            dtype=torch.float32)
    return QuantState(absmax=q.absmax, shape=torch.Size(q.shape),
                      code=code_4bit(q.quant_type).to(dev), blocksize=q.blocksize,
                      quant_type=q.quant_type, dtype=dtype, offset=q.offset, state2=nested)


def dequantize_4bit_bnb(q: Quantized4bit, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The full-precision tensor of `q`, by bitsandbytes."""
    from bitsandbytes.functional import dequantize_4bit

    # Shaped [bytes, 1] as bitsandbytes stores it (it transposes results for [1, bytes]).
    return dequantize_4bit(q.packed.reshape(-1, 1), quant_state(q, dtype)).view(q.shape)


def matmul_4bit_bnb(x: torch.Tensor, q: Quantized4bit) -> torch.Tensor:
    """x · Wᵀ for W = `q` by bitsandbytes' matmul_4bit: for up to ~1.5k rows of x (0.50's
    heuristic) its fused 4-bit GEMM reads W directly, beyond it dequantizes then multiplies.
    Forward only: `Linear4bit`'s backward forms the input gradient itself."""
    from bitsandbytes import matmul_4bit

    return matmul_4bit(x.detach(), q.packed.reshape(-1, 1).t(), quant_state(q, x.dtype))
