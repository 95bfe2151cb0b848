"""Blockwise 4-bit quantization (NF4/FP4) with double quantization of the block scales.

Layout matches bitsandbytes: flatten, one fp32 absmax per block of `blocksize` values (a short
last block has its own), nearest code (ties to the lower code), two codes per byte with the
first value in the high nibble. Double quantization stores the absmax values as 8-bit
dynamic-map codes of (absmax - mean) in blocks of 256, each block with one fp32 scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loratune.config import check_blocksize
from loratune.quant.codebooks import code_4bit, dynamic_map


def _block_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    n = flat.numel()
    full = n - n % blocksize
    absmax = flat[:full].view(-1, blocksize).abs().amax(dim=1)
    if full < n:
        absmax = torch.cat([absmax, flat[full:].abs().amax().view(1)])
    return absmax


def _scale_blocks(flat: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    n = flat.numel()
    full = n - n % blocksize
    safe = absmax.clamp(min=1e-38)
    # Full blocks multiply by the reciprocal, the short tail divides: bitsandbytes rounds
    # this way, and the last bit decides codes that sit on a boundary.
    head = flat[:full].view(-1, blocksize) * (1.0 / safe[: full // blocksize].view(-1, 1))
    tail = flat[full:] / safe[-1] if full < n else flat[:0]
    return torch.cat([head.reshape(-1), tail]).clamp(-1, 1)


def nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index into `code` of the nearest value; an exact midpoint goes to the lower value."""
    order = torch.argsort(code)
    ordered = code[order]
    mids = (ordered[:-1] + ordered[1:]) / 2
    return order[torch.bucketize(scaled, mids)].to(torch.uint8)


def quantize_blockwise_8bit(x: torch.Tensor, blocksize: int = 256,
                            signed: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit dynamic-map codes and per-block fp32 absmax (double-quant statistics, Adam states)."""
    flat = x.reshape(-1).float()
    absmax = _block_absmax(flat, blocksize)
    code = dynamic_map(signed).to(flat.device)
    return nearest_code(_scale_blocks(flat, absmax, blocksize), code), absmax


def dequantize_blockwise_8bit(codes: torch.Tensor, absmax: torch.Tensor, blocksize: int = 256,
                              signed: bool = True) -> torch.Tensor:
    values = dynamic_map(signed).to(codes.device)[codes.long()]
    return values * absmax.repeat_interleave(blocksize)[: values.numel()]


@dataclass
class Quantized4bit:
    """A 4-bit tensor: packed codes plus (possibly double-quantized) block scales."""

    packed: torch.Tensor          # uint8 [ceil(n/2)]
    shape: tuple[int, ...]
    blocksize: int
    quant_type: str
    absmax: torch.Tensor          # fp32 [blocks], or uint8 codes when double-quantized
    offset: torch.Tensor | None = None     # fp32 scalar (double quant)
    absmax2: torch.Tensor | None = None    # fp32 [ceil(blocks/256)] (double quant)

    @property
    def double_quant(self) -> bool:
        return self.offset is not None

    def block_scales(self) -> torch.Tensor:
        if not self.double_quant:
            return self.absmax
        return dequantize_blockwise_8bit(self.absmax, self.absmax2) + self.offset

    def nbytes(self) -> int:
        extra = [self.absmax, self.offset, self.absmax2]
        return self.packed.numel() + sum(t.numel() * t.element_size() for t in extra
                                         if t is not None)


def quantize_4bit(w: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4",
                  double_quant: bool = True) -> Quantized4bit:
    check_blocksize(blocksize)
    flat = w.detach().reshape(-1).float()
    absmax = _block_absmax(flat, blocksize)
    scaled = _scale_blocks(flat, absmax, blocksize)
    if scaled.numel() % 2:  # an odd count pads with a quantized zero, as bitsandbytes does
        scaled = torch.cat([scaled, scaled.new_zeros(1)])
    codes = nearest_code(scaled, code_4bit(quant_type).to(w.device))
    packed = (codes[0::2] << 4) | codes[1::2]
    q = Quantized4bit(packed, tuple(w.shape), blocksize, quant_type, absmax)
    if double_quant:
        offset = absmax.mean()
        q.absmax, q.absmax2 = quantize_blockwise_8bit(absmax - offset, 256)
        q.offset = offset
    return q


def dequantize_4bit(q: Quantized4bit, dtype: torch.dtype = torch.float32,
                    chunk_blocks: int = 65536) -> torch.Tensor:
    """The full-precision tensor, built a chunk of blocks at a time to bound temporaries."""
    n = 1
    for d in q.shape:
        n *= d
    table = code_4bit(q.quant_type).to(q.packed.device)
    scales = q.block_scales()
    out = torch.empty(n, dtype=dtype, device=q.packed.device)
    step = chunk_blocks * q.blocksize  # even, so a chunk starts on a byte boundary
    for start in range(0, n, step):
        stop = min(n, start + step)
        packed = q.packed[start // 2:(stop + 1) // 2]
        codes = torch.stack([packed >> 4, packed & 0xF], dim=1).view(-1)[: stop - start]
        values = table[codes.int()]
        block = torch.arange(start, stop, q.blocksize, device=values.device) // q.blocksize
        full = (stop - start) // q.blocksize * q.blocksize
        chunk = out[start:stop]
        chunk[:full].view(-1, q.blocksize).copy_(
            values[:full].view(-1, q.blocksize) * scales[block[: full // q.blocksize], None])
        if full < stop - start:
            chunk[full:].copy_(values[full:] * scales[block[-1]])
    return out.view(q.shape)
