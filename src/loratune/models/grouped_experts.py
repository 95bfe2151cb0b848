"""Routed experts computed per expert group: every (token, slot) pair routed to an expert is
gathered once, the rows sorted by expert, and each projection is one grouped matmul over the
sorted rows (`torch._grouped_mm`), or a loop over the active experts' contiguous slices.

transformers' eager experts forward loops over experts and gathers, scales and scatters each
expert's tokens separately; PEFT's `target_parameters` adds s·B_e·A_e to every expert's whole
fused weight on each call (and forms that sum's gradient in backward) before running it.
Here a low-rank term rides the same grouping: rows of expert e get x·A_eᵀ·B_eᵀ·s from two more
grouped matmuls through [E, r, in] and [E, out, r], so no [E, out, in] delta ever exists and
experts no token was routed to cost nothing. The routing weights are applied once, to the
sorted rows, and the rows summed back per token in a fixed order (no atomic adds).

The fused experts' adapter host (adapters/expert_lora.py) and the 4-bit experts
(models/moe_experts.py) both run their forward through `experts_forward`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

# "auto" and "grouped_mm": grouped_mm wherever it takes the operands, else the loop. Even on
# CPU a whole step with the loop measured 1.5x slower (benchmarks/README.md, moe_experts.py);
# "loop" is there to compare against.
BACKENDS = ("auto", "grouped_mm", "loop")
_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Groups:
    """The routed (token, slot) pairs sorted by expert; rows of one expert are contiguous."""

    order: torch.Tensor   # [M] flat (token * top_k + slot) index of each sorted row
    token: torch.Tensor   # [M] token each row came from
    expert: torch.Tensor  # [M] expert each row goes to
    weight: torch.Tensor  # [M] routing weight of each row
    ends: torch.Tensor    # [E] int32 running row count per expert (grouped_mm's offsets)
    spans: tuple[tuple[int, int, int], ...]  # (expert, first row, end row) of active experts
    top_k: int


def group_tokens(top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                 num_experts: int) -> Groups:
    """Sort the [tokens, top_k] routing by expert (stable: tokens ascending within an expert).
    An index >= num_experts is transformers' "no expert" slot (expert parallelism): dropped."""
    top_k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    # one host sync: the row counts decide the slices (transformers' eager loop syncs too)
    counts = torch.bincount(flat.clamp(max=num_experts), minlength=num_experts + 1)[:num_experts]
    ends = torch.cumsum(counts, 0, dtype=torch.int32)
    ends_list = ends.tolist()
    order = torch.argsort(flat, stable=True)[:ends_list[-1]]  # "no expert" slots sort last
    spans, start = [], 0
    for expert, end in enumerate(ends_list):
        if end > start:
            spans.append((expert, start, end))
        start = end
    return Groups(order, order // top_k, flat[order], top_k_weights.reshape(-1)[order], ends,
                  tuple(spans), top_k)


def grouped_mm_ok(x: torch.Tensor, weight_t: torch.Tensor) -> bool:
    """Whether torch._grouped_mm takes x [M, in] @ weight_t [E, in, out] as laid out: a float
    dtype both share, and every stride but the unit one a multiple of 16 bytes (CPU refuses
    others with "strides should be multiple of 16 bytes"; CUDA needs sm80+); where autograd
    records it, the [M, out] result's rows too: their gradient is backward's operand (LoRA's
    A at r=2 in fp32 gives 8-byte rows)."""
    if not hasattr(torch, "_grouped_mm") or x.dtype not in _GROUPED_DTYPES:
        return False
    if weight_t.dtype != x.dtype or x.device != weight_t.device:
        return False
    if x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) < (8, 0):
        return False
    backward = torch.is_grad_enabled() and (x.requires_grad or weight_t.requires_grad)
    out_row_ok = (weight_t.shape[-1] * x.element_size()) % 16 == 0
    return _aligned(x) and _aligned(weight_t) and (out_row_ok or not backward)


def _aligned(t: torch.Tensor) -> bool:
    if 1 not in t.stride()[-2:]:
        return False
    return all(s == 1 or (s * t.element_size()) % 16 == 0 for s in t.stride())


def _use_grouped(backend: str, x: torch.Tensor, weight_t: torch.Tensor) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"grouped experts backend {backend!r}: expected one of {BACKENDS}")
    if backend == "loop":
        return False
    return grouped_mm_ok(x, weight_t)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, groups: Groups,
                   backend: str = "auto") -> torch.Tensor:
    """Row i of sorted `x` [M, in] times weight[expert_i]ᵀ, weight [E, out, in] -> [M, out]."""
    if not groups.spans:
        return x.new_zeros(0, weight.shape[1])
    weight_t = weight.transpose(1, 2)
    if _use_grouped(backend, x, weight_t):
        return _DenseGrad.apply(torch._grouped_mm(x, weight_t, offs=groups.ends))
    return torch.cat([x[s:e] @ weight[ex].T for ex, s, e in groups.spans])


class _DenseGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: wrapped around a grouped matmul's
    output, as grouped_mm's CPU backward rejects a broadcast (stride-0) one (`out.sum()`)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


@dataclass(frozen=True)
class LowRank:
    """A per-expert low-rank term: rows of expert e get x·A_eᵀ·B_eᵀ·scale."""

    a: torch.Tensor  # [E, r, in]
    b: torch.Tensor  # [E, out, r]
    scale: float


def add_low_rank(y: torch.Tensor, x: torch.Tensor, terms: Sequence[LowRank], groups: Groups,
                 backend: str = "auto") -> torch.Tensor:
    """y plus every term, each computed in the terms' dtype on the same grouping as y."""
    for t in terms:
        u = grouped_linear(x.to(t.a.dtype), t.a, groups, backend)
        # B's file layout is rank-major (a strided view): one small copy makes it grouped-ready
        v = grouped_linear(u, t.b.contiguous(), groups, backend)
        y = y + (v * t.scale).to(y.dtype)
    return y


def gated(act_fn: Callable) -> Callable[[torch.Tensor], torch.Tensor]:
    """transformers' concatenated gate/up activation: act(gate) * up over [gate | up] columns."""
    def glu(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return act_fn(gate) * up
    return glu


def clamped_swiglu(alpha: float, limit: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """GPT-OSS's activation over gate/up interleaved by column (gate = [..., ::2], up =
    [..., 1::2]): both clamped to `limit`, then (up + 1) · gate · sigmoid(alpha · gate)."""
    def glu(gate_up: torch.Tensor) -> torch.Tensor:
        gate = gate_up[..., ::2].clamp(max=limit)
        up = gate_up[..., 1::2].clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))
    return glu


def experts_forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor, num_experts: int,
                    project: Callable[[str, torch.Tensor, Groups], torch.Tensor],
                    glu: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The experts module's output [tokens, hidden]: `project(name, rows, groups)` computes the
    "gate_up_proj" and "down_proj" of sorted rows, `glu` joins gate and up between them."""
    groups = group_tokens(top_k_index, top_k_weights, num_experts)
    h = glu(project("gate_up_proj", hidden_states[groups.token], groups))
    y = project("down_proj", h, groups) * groups.weight[:, None]
    n, width = hidden_states.shape[0], y.shape[-1]
    # back to (token, slot) order, then the top_k slots summed per token: no atomic adds
    slots = y.new_zeros(n * groups.top_k, width).index_copy(0, groups.order, y)
    return slots.view(n, groups.top_k, width).sum(1).to(hidden_states.dtype)
