"""Quantization: blockwise 4-bit NF4/FP4 with double-quantized scales (bitsandbytes' layout)."""

from loratune.quant.codebooks import NF4, code_4bit, dynamic_map
from loratune.quant.nf4 import Quantized4bit, dequantize_4bit, quantize_4bit

__all__ = ["NF4", "Quantized4bit", "code_4bit", "dequantize_4bit", "dynamic_map", "quantize_4bit"]
