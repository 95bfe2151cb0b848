"""LoftQ (init_lora_weights: loftq): start QLoRA from a base whose quantization error the
adapter already holds (Li et al., 2023).

Alternate `loftq_iter` times: Q = NF4(W − s·B·A), then s·B·A = the best rank-r approximation
of W − Q (SVD). The base becomes Q (dequantized: the layer stays a full-precision nn.Linear
holding NF4 values), so Q + s·B·A is closer to W than plain QLoRA's NF4(W) + 0. Quantizing that
layer again with the same layout (blocksize 64, no double quantization, as PEFT's
`loftq_init` asks bitsandbytes for) gives back exactly Q.

PEFT sets B·A to the approximation without the scale s, which is only right when
lora_alpha = r (its defaults); here s·B·A is, for any alpha. A saved LoftQ file keeps
`init_lora_weights: loftq`: loading it reruns the (deterministic) init on the original
weights, then copies its A and B in, as PEFT does.
"""

from __future__ import annotations

import torch

from loratune.adapters.base_inits import InitSpec, register_init
from loratune.quant.nf4 import dequantize_4bit, quantize_4bit

BLOCKSIZE = 64  # bitsandbytes' default, which PEFT's loftq_init uses
DOUBLE_QUANT = False  # PEFT's loftq_init: compress_statistics=False


def nf4_round_trip(w: torch.Tensor) -> torch.Tensor:
    """W as the 4-bit base will hold it: NF4-quantized and dequantized, in fp32."""
    q = quantize_4bit(w, BLOCKSIZE, "nf4", DOUBLE_QUANT)
    return dequantize_4bit(q, torch.float32)


def low_rank(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L [out, r], R [r, in]) with L·R the best rank-r approximation of `w`, √S on each side."""
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = torch.sqrt(s[:r])
    return u[:, :r] * root[None, :], root[:, None] * vh[:r]


def loftq(w: torch.Tensor, r: int, scale: float, config) -> tuple[torch.Tensor, ...]:
    """(A, B, Q) after `loftq_iter` alternations; s·B·A ≈ W − Q."""
    steps = config.loftq_config.loftq_iter
    residual = w
    for step in range(steps):
        q = nf4_round_trip(residual)
        left, right = low_rank(w - q, r)
        if step + 1 < steps:
            residual = w - left @ right
    root = scale ** 0.5
    return right / root, left / root, q


register_init(InitSpec(
    "loftq", from_base=loftq, converts_on_save=False,
    peft_fields=lambda model, name, config: {"loftq_config": config.loftq_config.model_dump()},
    unused_fields={"loftq_config": {}}))
