"""A frozen linear layer stored in 4 bits; QLoRA puts LoRA on top of it (`AdaptedLinear`).

The full-precision weight exists only inside one call: forward dequantizes, multiplies and
drops it (a few rows, with the triton or bitsandbytes kernel: the matmul reads the 4-bit weight
itself); backward dequantizes again to form the input gradient (the weight gets none).
"""

from __future__ import annotations

import torch
from torch import nn

from loratune.quant.kernels import dequantize, matmul_4bit
from loratune.quant.nf4 import Quantized4bit, quantize_4bit


class _Frozen4bitMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "Linear4bit") -> torch.Tensor:
        ctx.layer = layer  # keep the 4-bit layer, not the dequantized weight, for backward
        return matmul_4bit(x, layer.quantized(), layer.kernel)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.layer.dequantize(grad.dtype), None


class Linear4bit(nn.Module):
    def __init__(self, q: Quantized4bit, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype = torch.float32, kernel: str = "auto"):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.blocksize, self.quant_type = q.blocksize, q.quant_type
        self.compute_dtype = compute_dtype
        self.kernel = kernel  # quantization.kernel, resolved per call for the buffers' device
        self.register_buffer("packed", q.packed)
        self.register_buffer("absmax", q.absmax)
        self.register_buffer("offset", q.offset)
        self.register_buffer("absmax2", q.absmax2)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, quant_type: str = "nf4",
                    double_quant: bool = True, compute_dtype: torch.dtype = torch.float32,
                    kernel: str = "auto"):
        q = quantize_4bit(linear.weight.data, blocksize, quant_type, double_quant)
        bias = None if linear.bias is None else linear.bias.data.to(compute_dtype)
        return cls(q, bias, compute_dtype, kernel)

    def shardable(self) -> "Linear4bit":
        """Hold the packed codes and block scales as frozen Parameters instead of buffers.

        FSDP2 (`fully_shard`) shards Parameters only (along dim 0, any dtype, padded when
        uneven): so stored, each rank keeps 1/world of the 4-bit bytes and the layer's unit
        all-gathers them around its forward and backward, as it does full-precision weights.
        The double-quant offset and second-level scales (a few bytes) stay replicated."""
        for name in ("packed", "absmax"):
            if name in self._buffers:
                self.register_parameter(name, nn.Parameter(self._buffers.pop(name),
                                                           requires_grad=False))
        return self

    def quantized(self) -> Quantized4bit:
        return Quantized4bit(self.packed, (self.out_features, self.in_features), self.blocksize,
                             self.quant_type, self.absmax, self.offset, self.absmax2)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.quantized(), dtype or self.compute_dtype, self.kernel)

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _Frozen4bitMatmul.apply(x.to(self.compute_dtype), self)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        dq = "double-quant" if self.offset is not None else "fp32 scales"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{self.quant_type}, block={self.blocksize}, {dq}, compute={self.compute_dtype}, "
                f"kernel={self.kernel}")
