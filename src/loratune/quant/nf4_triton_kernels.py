"""The Triton kernel behind nf4_triton.py (imported only when it is used: importing triton is
slow, and its interpreter mode is chosen when a kernel is defined)."""

import triton
import triton.language as tl


@triton.jit
def rounded(v, BF16: tl.constexpr, kind):
    if BF16:
        # fp32 -> bf16 bits, round to nearest even, as torch casts (values are finite). An
        # explicit integer rounding: Triton's interpreter truncates in its bf16 cast.
        b = v.to(tl.uint32, bitcast=True)
        return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).to(tl.int16)
    return v.to(kind)


@triton.jit
def dequant_4bit(packed, absmax, absmax2, offset, code, dmap, out, n,
                 BLOCKSIZE: tl.constexpr, DOUBLE: tl.constexpr, BF16: tl.constexpr,
                 TILE: tl.constexpr):
    byte = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
    in_range = byte < (n + 1) // 2
    p = tl.load(packed + byte, mask=in_range, other=0).to(tl.int32)
    first = byte * 2  # the high nibble's index; the low one follows, in the same block
    block = first // BLOCKSIZE
    if DOUBLE:
        c = tl.load(absmax + block, mask=in_range, other=0).to(tl.int32)
        group = tl.load(absmax2 + block // 256, mask=in_range, other=0.0)
        scale = tl.load(dmap + c) * group
        scale = scale + tl.load(offset)
    else:
        scale = tl.load(absmax + block, mask=in_range, other=0.0)
    hi = tl.load(code + ((p >> 4) & 15)) * scale
    lo = tl.load(code + (p & 15)) * scale
    kind = out.dtype.element_ty
    tl.store(out + first, rounded(hi, BF16, kind), mask=in_range & (first < n))
    tl.store(out + first + 1, rounded(lo, BF16, kind), mask=in_range & (first + 1 < n))
