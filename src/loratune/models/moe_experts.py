"""Routed experts of a mixture-of-experts layer, held in 4 bits, one NF4 matrix per expert.

transformers 5 stores a layer's routed experts as fused 3-D parameters (`gate_up_proj`
[experts, 2*inter, hidden], `down_proj` [experts, hidden, inter]; GPT-OSS transposed, with
biases and interleaved gate/up columns). `QuantizedExperts` replaces such a module: each
expert's matrix becomes a `Linear4bit` stored as [out, in], so its blocks run along the input
dim, and the forward (tokens grouped per expert, models/grouped_experts.py) dequantizes only
the experts the router picked, with the same math as transformers' experts forward. The
router and norms are not touched (they stay in the compute dtype with the rest of what is not
quantized).

Per-expert adapters add their term in `project`: a module in `self.adapters` with a
`low_rank(projection)` method (a `LowRank`: A [E, r, in], B [E, out, r], scale) joins the
grouped matmuls; one with `delta(projection, expert, x)` returns what it adds to that expert's
rows, called once per active expert.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from loratune.models.grouped_experts import (Groups, add_low_rank, clamped_swiglu,
                                             experts_forward, gated)
from loratune.quant.linear4bit import Linear4bit
from loratune.quant.nf4 import quantize_4bit

PROJECTIONS = ("gate_up_proj", "down_proj")


# Checkpoints (transformers' save_pretrained too) store routed experts one matrix per expert,
# under their pre-transformers-5 names; the model holds them fused (experts.gate_up_proj =
# [gate | up] rows per expert, experts.down_proj). Mixtral's block is `mlp`, once
# `block_sparse_moe`, and its w1/w3/w2 are gate/up/down.
_PER_EXPERT_KEY = re.compile(
    r"(.+\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight")
_PART_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_LEGACY_NAMES = ((".block_sparse_moe.", ".mlp."),)


def current_name(key: str) -> str:
    """A checkpoint key under transformers 5's module names (Mixtral's block_sparse_moe: mlp)."""
    for old, new in _LEGACY_NAMES:
        key = key.replace(old, new)
    return key


def per_expert_key(key: str) -> tuple[str, int, str] | None:
    """(experts module path under current names, expert, "gate_proj" / "up_proj" / "down_proj")
    of one expert's matrix in a per-expert checkpoint; None for any other key."""
    m = _PER_EXPERT_KEY.fullmatch(current_name(key))
    return None if m is None else (m[1], int(m[2]), _PART_NAMES.get(m[3], m[3]))


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers experts module: 3-D gate_up_proj and down_proj parameters."""
    return all(isinstance(getattr(module, n, None), torch.Tensor)
               and getattr(module, n).dim() == 3 for n in PROJECTIONS)


def expert_glu(experts: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What joins gate and up in a transformers experts module: its act_fn over [gate | up]
    halves, or GPT-OSS's clamped SwiGLU over interleaved columns; None for neither (unknown)."""
    if getattr(experts, "is_concatenated", True):
        act_fn = getattr(experts, "act_fn", None)
        return None if act_fn is None else gated(act_fn)
    if hasattr(experts, "alpha") and hasattr(experts, "limit"):
        return clamped_swiglu(experts.alpha, experts.limit)
    return None


def out_in(experts: nn.Module, projection: str) -> torch.Tensor:
    """A fused experts parameter as [E, out, in]: GPT-OSS stores [E, in, out] (x @ W), so a
    transposed view of it, sharing its storage (and its gradient)."""
    weight = getattr(experts, projection)
    return weight.transpose(1, 2) if getattr(experts, "is_transposed", False) else weight


def add_expert_bias(experts: nn.Module, projection: str, y: torch.Tensor,
                    groups: Groups) -> torch.Tensor:
    """Sorted rows' projection plus each row's expert's bias (GPT-OSS's `<projection>_bias`
    [E, out]); `y` as is for experts without biases."""
    bias = getattr(experts, projection + "_bias", None)
    return y if bias is None else y + bias[groups.expert].to(y.dtype)


class QuantizedExperts(nn.Module):
    """Frozen routed experts in 4 bits; `forward(hidden, top_k_index, top_k_weights)` as the
    experts module it replaces."""

    def __init__(self, experts: nn.Module, compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        name = type(experts).__name__
        self.num_experts = experts.gate_up_proj.shape[0]
        self.transposed = bool(getattr(experts, "is_transposed", False))
        self._glu = expert_glu(experts)
        if self._glu is None:
            raise ValueError(f"{name}: gate/up experts with neither an act_fn nor GPT-OSS's "
                             f"alpha/limit gate; loratune does not know their activation")
        self.compute_dtype = compute_dtype
        self.gate_up_proj, self.down_proj = nn.ModuleList(), nn.ModuleList()
        self._slots: dict[str, dict[int, Linear4bit]] = {}  # experts quantized so far (loader)
        for p in PROJECTIONS:  # biases keep their names (and stay meta until the loader fills them)
            bias = getattr(experts, p + "_bias", None)
            if bias is not None:
                self.register_parameter(p + "_bias", nn.Parameter(bias.data, requires_grad=False))
        self.adapters = nn.ModuleDict()  # per-expert adapters: .low_rank(...) or .delta(...)
        self.grouping = "auto"  # models/grouped_experts.py BACKENDS

    def load(self, projection: str, weight: torch.Tensor, blocksize: int = 64,
             quant_type: str = "nf4", double_quant: bool = True, kernel: str = "auto") -> None:
        """Quantize the fused [experts, ...] tensor of `projection`, one expert at a time."""
        if weight.dim() != 3 or weight.shape[0] != self.num_experts:
            raise ValueError(f"{projection}: expected a [{self.num_experts}, ., .] tensor of "
                             f"routed experts, got {tuple(weight.shape)}")
        for expert, w in enumerate(weight):
            self.put(projection, expert, w, blocksize, quant_type, double_quant, kernel)

    def put(self, projection: str, expert: int, weight: torch.Tensor, blocksize: int = 64,
            quant_type: str = "nf4", double_quant: bool = True, kernel: str = "auto") -> None:
        """Quantize one expert's matrix (as transformers stores it in the fused tensor); the
        loader calls this as a checkpoint's per-expert tensors arrive, in any order."""
        if projection not in PROJECTIONS or not 0 <= expert < self.num_experts:
            raise ValueError(f"{projection}.{expert}: expected gate_up_proj or down_proj of "
                             f"an expert in 0..{self.num_experts - 1}")
        q = quantize_4bit(weight.t() if self.transposed else weight, blocksize, quant_type,
                          double_quant)
        slots = self._slots.setdefault(projection, {})
        slots[expert] = Linear4bit(q, None, self.compute_dtype, kernel)
        if len(slots) == self.num_experts:
            getattr(self, projection).extend(slots[e] for e in range(self.num_experts))
            del self._slots[projection]

    def missing(self) -> list[str]:
        return [p for p in PROJECTIONS if len(getattr(self, p)) != self.num_experts]

    def quantized_bytes(self) -> int:
        return sum(m.quantized().nbytes() for p in PROJECTIONS for m in getattr(self, p))

    def dequantized(self, projection: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The fused tensor in the layout transformers stores it in (for checks and merges)."""
        mats = [m.dequantize(dtype) for m in getattr(self, projection)]
        return torch.stack([w.t() for w in mats] if self.transposed else mats)

    def glu(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self._glu(gate_up)

    def project(self, projection: str, x: torch.Tensor, groups: Groups) -> torch.Tensor:
        """Sorted rows' projection: each active expert's 4-bit matrix on its contiguous rows
        (experts no token was routed to are never dequantized), its bias, then the adapters'
        terms in the same grouping."""
        layers = getattr(self, projection)
        y = torch.cat([layers[ex](x[s:e]) for ex, s, e in groups.spans]) if groups.spans \
            else x.new_zeros(0, layers[0].out_features)
        return self._adapted(projection, add_expert_bias(self, projection, y, groups), x, groups)

    def _adapted(self, projection: str, y: torch.Tensor, x: torch.Tensor,
                 groups: Groups) -> torch.Tensor:
        # adapters exposing low_rank(...) join the grouped matmuls; others add delta per expert
        ads = list(self.adapters.values())
        terms = [a.low_rank(projection) for a in ads if hasattr(a, "low_rank")]
        y = add_low_rank(y, x, terms, groups, self.grouping)
        for adapter in (a for a in ads if not hasattr(a, "low_rank")) if groups.spans else ():
            y = y + torch.cat([adapter.delta(projection, ex, x[s:e])
                               for ex, s, e in groups.spans]).to(y.dtype)
        return y

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        # an index == num_experts is transformers' "no expert" slot: group_tokens drops it
        return experts_forward(hidden_states, top_k_index, top_k_weights, self.num_experts,
                               self.project, self.glu)


def quantize_experts(experts: nn.Module, blocksize: int = 64, quant_type: str = "nf4",
                     double_quant: bool = True, compute_dtype: torch.dtype = torch.float32,
                     kernel: str = "auto") -> QuantizedExperts:
    """A loaded experts module's 4-bit replacement (biases copied in the compute dtype)."""
    q = QuantizedExperts(experts, compute_dtype)
    for p in PROJECTIONS:
        q.load(p, getattr(experts, p).data, blocksize, quant_type, double_quant, kernel)
        bias = getattr(q, p + "_bias", None)
        if bias is not None:
            bias.data = bias.data.to(compute_dtype)
    return q
