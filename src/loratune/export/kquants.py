"""Q4_K and Q6_K quantization (llama.cpp's k-quant block layouts), which `gguf` can only read.

A k-quant super-block holds 256 values. Q4_K: 8 sub-blocks of 32, each with a 6-bit scale and
6-bit min under two fp16 super-scales; x ≈ d·sc·q − dmin·m with q in 0..15. Q6_K: 16 groups of
16 with int8 scales under one fp16 scale; x ≈ d·sc·q with q in −32..31. Scales here come from
each group's range (no iterative search), and every block layout is checked by reading it back
with `gguf.quants.dequantize` in the tests.
"""

from __future__ import annotations

import numpy as np

QK_K = 256


def _blocks(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.shape[-1] % QK_K:
        raise ValueError(f"k-quants need rows that are a multiple of {QK_K}, got {x.shape[-1]}")
    return x.reshape(-1, QK_K)


def _f16(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16).view(np.uint8).reshape(-1, 2)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """[rows, cols] float -> [rows, cols/256·144] uint8 blocks."""
    rows = np.asarray(x).shape[0]
    b = _blocks(x).reshape(-1, 8, 32)
    lo = np.minimum(b.min(-1), 0.0)  # the format's offset can only lower values
    hi = np.maximum(b.max(-1), lo)
    scale = (hi - lo) / 15.0
    mins = -lo
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
    out = np.concatenate([_f16(d), _f16(dmin), scales, qs], axis=1)
    return out.reshape(rows, -1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """[rows, cols] float -> [rows, cols/256·210] uint8 blocks."""
    rows = np.asarray(x).shape[0]
    b = _blocks(x)
    n = b.shape[0]
    groups = b.reshape(n, 16, 16)
    # Signed group scale chosen so the largest magnitude maps to −32 (the longer side).
    idx = np.abs(groups).argmax(-1)
    peak = np.take_along_axis(groups, idx[..., None], -1)[..., 0]
    scale = -peak / 32.0
    d = (np.abs(scale).max(-1) / 127.0).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(scale / np.where(d > 0, d, 1)[:, None]), -128, 127)
    step = d[:, None] * sc
    q = np.rint(groups / np.where(step != 0, step, 1)[..., None])
    q = np.clip(np.where(step[..., None] != 0, q, 0), -32, 31).astype(np.int16) + 32
    q = q.reshape(n, 2, 4, 32).astype(np.uint8)  # [half, group of 32 (s), i]
    low, high = q & 0xF, q >> 4
    ql = np.concatenate([low[:, :, 0:2] | (low[:, :, 2:4] << 4)], axis=2).reshape(n, 128)
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6))
    out = np.concatenate([ql, qh.reshape(n, 64), sc.astype(np.int8).view(np.uint8), _f16(d)],
                         axis=1)
    return out.reshape(rows, -1)
