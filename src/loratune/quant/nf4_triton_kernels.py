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
def rounded_fp32(v, BF16: tl.constexpr, kind):
    """v rounded to `kind` (bf16: to nearest even, see `rounded`), held in fp32."""
    if BF16:
        b = v.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        return b.to(tl.float32, bitcast=True)
    return v.to(kind).to(tl.float32)


@triton.jit
def block_scale(block, mask, absmax, absmax2, offset, dmap, DOUBLE: tl.constexpr):
    """The fp32 scale of each 4-bit block: stored, or decoded from its 8-bit code (double
    quant: code value × its group's scale, then + offset, two roundings as in PyTorch)."""
    if DOUBLE:
        c = tl.load(absmax + block, mask=mask, other=0).to(tl.int32)
        group = tl.load(absmax2 + block // 256, mask=mask, other=0.0)
        scale = tl.load(dmap + c) * group
        scale = scale + tl.load(offset)
    else:
        scale = tl.load(absmax + block, mask=mask, other=0.0)
    return scale


@triton.jit
def dequant_4bit(packed, absmax, absmax2, offset, code, dmap, out, n,
                 BLOCKSIZE: tl.constexpr, DOUBLE: tl.constexpr, BF16: tl.constexpr,
                 TILE: tl.constexpr):
    byte = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
    in_range = byte < (n + 1) // 2
    p = tl.load(packed + byte, mask=in_range, other=0).to(tl.int32)
    first = byte * 2  # the high nibble's index; the low one follows, in the same block
    scale = block_scale(first // BLOCKSIZE, in_range, absmax, absmax2, offset, dmap, DOUBLE)
    hi = tl.load(code + ((p >> 4) & 15)) * scale
    lo = tl.load(code + (p & 15)) * scale
    kind = out.dtype.element_ty
    tl.store(out + first, rounded(hi, BF16, kind), mask=in_range & (first < n))
    tl.store(out + first + 1, rounded(lo, BF16, kind), mask=in_range & (first + 1 < n))


@triton.jit
def matmul_4bit_few(x, packed, absmax, absmax2, offset, code, dmap, out, M, N, K,
                    BLOCKSIZE: tl.constexpr, DOUBLE: tl.constexpr, BF16: tl.constexpr,
                    FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """out [M, N] = x [M, K] · Wᵀ for a few rows of x (M ≤ BLOCK_M), W [N, K] read in 4 bits:
    each program decodes a [BLOCK_N, BLOCK_K] tile at a time, never the whole weight."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    kind = x.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        valid = (rn[:, None] < N) & (rk[None, :] < K)
        flat = rn[:, None].to(tl.int64) * K + rk[None, :]
        p = tl.load(packed + flat // 2, mask=valid, other=0).to(tl.int32)
        nibble = tl.where(flat % 2 == 0, (p >> 4) & 15, p & 15)
        scale = block_scale(flat // BLOCKSIZE, valid, absmax, absmax2, offset, dmap, DOUBLE)
        # The weight as the dequantizing path forms it: fp32 product rounded to x's dtype. The
        # dot runs on fp32 operands: bf16/fp16 values are exact in TF32, so the products are
        # too; fp32 ones need full precision (no TF32).
        w = rounded_fp32(tl.where(valid, tl.load(code + nibble) * scale, 0.0), BF16, kind)
        xs = tl.load(x + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K),
                     other=0.0).to(tl.float32)
        if FP32:
            acc += tl.dot(xs, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(xs, tl.trans(w), input_precision="tf32")
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(out + rm[:, None] * N + rn[None, :], rounded(acc, BF16, kind), mask=mask)
