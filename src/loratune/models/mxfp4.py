"""GPT-OSS's MXFP4 checkpoints, decoded.

OpenAI ships GPT-OSS with its routed experts in MXFP4 (OCP microscaling): FP4 (e2m1) values in
blocks of 32 sharing one power-of-two scale, stored per fused parameter as `<param>_blocks`
[E, out, in/32, 16] uint8 (two values a byte, low nibble first) and `<param>_scales`
[E, out, in/32] uint8 (the exponent + 127), with `quantization_config.quant_method: mxfp4` in
config.json. transformers dequantizes them on load where it has no MXFP4 kernels (CPU); the
streamed merge and export read checkpoints themselves, so they decode the same way here, to the
fused [E, in, out] parameter the model holds. Every MXFP4 value is exact in bfloat16.
"""

from __future__ import annotations

import torch

# e2m1: sign, two exponent bits, one mantissa bit (the code's index is its 4-bit pattern)
FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
            -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCKS, SCALES = "_blocks", "_scales"


def is_mxfp4(config: dict) -> bool:
    """Whether config.json says the checkpoint holds MXFP4 experts."""
    quant = config.get("quantization_config") or {}
    return isinstance(quant, dict) and quant.get("quant_method") == "mxfp4"


def mxfp4_params(names, where: str) -> dict[str, tuple[str, str]]:
    """{parameter: (its blocks name, its scales name)} of the MXFP4 pairs among `names`; a
    blocks tensor without its scales (or the reverse) is refused, naming it."""
    names = set(names)
    params = {n[: -len(suffix)] for n in names for suffix in (BLOCKS, SCALES) if n.endswith(suffix)}
    for param in sorted(params):
        for suffix in (BLOCKS, SCALES):
            if param + suffix not in names:
                raise ValueError(f"{where}: MXFP4 tensor {param + suffix} is missing (its "
                                 "blocks and scales come in pairs)")
    return {p: (p + BLOCKS, p + SCALES) for p in params}


def mxfp4_shape(blocks_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The decoded parameter's shape [E, in, out] from the blocks' [E, out, in/32, 16]."""
    *lead, out, groups, half = blocks_shape
    return (*lead, groups * half * 2, out)


def check_mxfp4(blocks, scales, where: str) -> None:
    """Blocks and scales (tensors, or anything with their dtype and shape) as MXFP4 lays them
    out, else a ValueError naming `where` (file and parameter)."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or \
            tuple(blocks.shape[:-1]) != tuple(scales.shape) or blocks.shape[-1] != 16:
        raise ValueError(f"{where}: expected uint8 blocks [..., groups, 16] and uint8 scales "
                         f"[..., groups] (MXFP4), got {blocks.dtype} {tuple(blocks.shape)} and "
                         f"{scales.dtype} {tuple(scales.shape)}")


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor,
                     dtype: torch.dtype = torch.bfloat16, where: str = "MXFP4") -> torch.Tensor:
    """[E, out, in/32, 16] uint8 codes and [E, out, in/32] uint8 exponents -> [E, in, out]. A
    scale of 255 (E8M0's NaN) or one that overflows the values is refused, naming `where`."""
    check_mxfp4(blocks, scales, where)
    lut = torch.tensor(FP4_E2M1, dtype=torch.float32)
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).flatten(-2).long()
    values = torch.ldexp(lut[codes], scales.to(torch.int32)[..., None] - 127)
    if (scales == 255).any() or not torch.isfinite(values).all():
        raise ValueError(f"{where}: MXFP4 scales decode to NaN or past float32 (largest scale "
                         f"byte {int(scales.max())}; 255 is NaN, a checkpoint's are near 127)")
    return values.flatten(-2).transpose(-1, -2).to(dtype)
