"""Q4_K and Q6_K quantization (llama.cpp's k-quant block layouts), which `gguf` can only read.

A k-quant super-block holds 256 values. Q4_K: 8 sub-blocks of 32, each with a 6-bit scale and
6-bit min under two fp16 super-scales; x ≈ d·sc·q − dmin·m with q in 0..15. Q6_K: 16 groups of
16 with int8 scales under one fp16 scale; x ≈ d·sc·q with q in −32..31.

Each group's scale (and Q4_K's min) is fitted, not just taken from the range: a few candidate
steps around range/levels are tried, each rounding is followed by the least-squares scale (and
min) for those codes, and the candidate with the smallest squared error is kept. Every block
layout is checked by reading it back with `gguf.quants.dequantize` in the tests.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
# Candidate steps: range/levels scaled by these factors (1.0 = the plain range fit).
STEP_FACTORS = np.linspace(0.80, 1.10, 16, dtype=np.float32)


def fit_affine(x: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Per group (last axis) the step s ≥ 0 and offset c ≤ 0 of x ≈ s·q + c, q in 0..levels,
    with the smallest weighted squared error over the candidate steps. Weights rms + |x| favour
    the large values, whose errors move a layer's output most."""
    w = np.sqrt((x * x).mean(-1, keepdims=True)) + np.abs(x)
    lo = np.minimum(x.min(-1), 0.0)   # the format's offset can only lower values
    hi = np.maximum(x.max(-1), lo)
    span = hi - lo
    best_err = np.full(lo.shape, np.inf, dtype=np.float32)
    best_s, best_c = span / levels, lo
    sw, swx = w.sum(-1), (w * x).sum(-1)
    for f in STEP_FACTORS:
        step = span / levels * f
        q = np.clip(np.rint((x - lo[..., None]) / np.where(step > 0, step, 1)[..., None]),
                    0, levels)
        wq = w * q
        sq, sqq, sqx = wq.sum(-1), (wq * q).sum(-1), (wq * x).sum(-1)
        det = sw * sqq - sq * sq
        s = np.where(det > 0, (sw * sqx - sq * swx) / np.where(det > 0, det, 1), step)
        c = (swx - s * sq) / sw
        # The offset must stay ≤ 0 and the step ≥ 0: refit the step alone where it is not.
        bad = (c > 0) | (s < 0)
        s = np.where(bad, np.where(sqq > 0, sqx / np.where(sqq > 0, sqq, 1), 0), s)
        c = np.where(bad, 0.0, c)
        s = np.maximum(s, 0.0)
        err = (w * (s[..., None] * q + c[..., None] - x) ** 2).sum(-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_s, best_c = np.where(better, s, best_s), np.where(better, c, best_c)
    return best_s.astype(np.float32), best_c.astype(np.float32)


def fit_symmetric(x: np.ndarray) -> np.ndarray:
    """Per group the signed step s of x ≈ s·q, q in −32..31, with the smallest squared error
    weighted by x² (large values first, as for Q4_K)."""
    w = x * x
    idx = np.abs(x).argmax(-1)
    peak = np.take_along_axis(x, idx[..., None], -1)[..., 0]
    base = -peak / 32.0      # the largest magnitude maps to −32 (the longer side)
    best_err = np.full(base.shape, np.inf, dtype=np.float32)
    best = base
    for f in STEP_FACTORS:
        step = base * f
        q = np.clip(np.rint(x / np.where(step != 0, step, 1)[..., None]), -32, 31)
        qq = (w * q * q).sum(-1)
        s = np.where(qq > 0, (w * q * x).sum(-1) / np.where(qq > 0, qq, 1), 0.0)
        err = (w * (s[..., None] * q - x) ** 2).sum(-1)
        better = err < best_err
        best_err, best = np.where(better, err, best_err), np.where(better, s, best)
    return best.astype(np.float32)


def _blocks(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.shape[-1] % QK_K:
        raise ValueError(f"k-quants need rows that are a multiple of {QK_K}, got {x.shape[-1]}")
    return x.reshape(-1, QK_K)


def _f16(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16).view(np.uint8).reshape(-1, 2)


# Super-blocks encoded at a time: the fit's temporaries stay ~100 MB whatever the tensor.
CHUNK = 4096


def _chunked(encode, x: np.ndarray) -> np.ndarray:
    """Encode [rows, cols] super-block by super-block, a chunk at a time."""
    rows = np.asarray(x).shape[0]
    b = _blocks(x)
    out = [encode(b[i:i + CHUNK]) for i in range(0, len(b), CHUNK)]
    return np.concatenate(out).reshape(rows, -1)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """[rows, cols] float -> [rows, cols/256·144] uint8 blocks."""
    return _chunked(_q4_k_blocks, x)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """[rows, cols] float -> [rows, cols/256·210] uint8 blocks."""
    return _chunked(_q6_k_blocks, x)


def _q4_k_blocks(blocks: np.ndarray) -> np.ndarray:
    b = blocks.reshape(-1, 8, 32)
    scale, offset = fit_affine(b, 15)
    mins = -offset
    d = (scale.max(-1) / 63.0).astype(np.float16).astype(np.float32)
    dmin = (mins.max(-1) / 63.0).astype(np.float16).astype(np.float32)
    sc = np.where(d[:, None] > 0, np.rint(scale / np.where(d > 0, d, 1)[:, None]), 0)
    mn = np.where(dmin[:, None] > 0, np.rint(mins / np.where(dmin > 0, dmin, 1)[:, None]), 0)
    sc, mn = np.clip(sc, 0, 63).astype(np.uint8), np.clip(mn, 0, 63).astype(np.uint8)
    step = d[:, None] * sc
    offset = dmin[:, None] * mn
    q = np.rint((b + offset[..., None]) / np.where(step > 0, step, 1)[..., None])
    q = np.clip(np.where(step[..., None] > 0, q, 0), 0, 15).astype(np.uint8)
    scales = np.concatenate([
        sc[:, :4] | ((sc[:, 4:] >> 4) << 6),
        mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
        (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4),
    ], axis=1)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)  # sub-blocks 2c (low), 2c+1 (high)
    return np.concatenate([_f16(d), _f16(dmin), scales, qs], axis=1)


def _q6_k_blocks(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    groups = b.reshape(n, 16, 16)
    scale = fit_symmetric(groups)
    d = (np.abs(scale).max(-1) / 127.0).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(scale / np.where(d > 0, d, 1)[:, None]), -128, 127)
    step = d[:, None] * sc
    q = np.rint(groups / np.where(step != 0, step, 1)[..., None])
    q = np.clip(np.where(step[..., None] != 0, q, 0), -32, 31).astype(np.int16) + 32
    q = q.reshape(n, 2, 4, 32).astype(np.uint8)  # [half, group of 32 (s), i]
    low, high = q & 0xF, q >> 4
    ql = np.concatenate([low[:, :, 0:2] | (low[:, :, 2:4] << 4)], axis=2).reshape(n, 128)
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6))
    return np.concatenate([ql, qh.reshape(n, 64), sc.astype(np.int8).view(np.uint8), _f16(d)],
                          axis=1)
