"""LoKr: ΔW = W1 ⊗ W2 · alpha/r, a Kronecker product (Edalati et al. 2022, KronA; PEFT's LOKR,
after LyCORIS).

Each side of the layer is split in two, out = a·b and in = c·d (`factorization`), and
W1 [a, c] ⊗ W2 [b, d] is [out, in]. W2, the large factor, is a rank-r product W2a·W2b unless r
reaches half its larger side; W1 stays a full matrix unless `decompose_both` (then the same
rule). By default W1 (or W1a) starts at 0, so a fresh adapter changes nothing.
"""

from __future__ import annotations

import torch

from loratune.adapters.delta_weight import DeltaWeightAdapter, factored_peft_fields, he_uniform
from loratune.adapters.registry import FileSpec, MethodRecord, register
from loratune.config import LoKrConfig

LOKR_KINDS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """dim = m·n as PEFT (and LyCORIS) split it: m = factor when it divides dim; else walk the
    divisors upwards while m < n (and m ≤ factor, when given) and return the pair smaller first."""
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    limit = dim if factor == -1 else factor
    m, n = 1, dim
    for d in range(2, dim + 1):
        if m >= n or d > limit:
            break
        if dim % d == 0:
            m, n = d, dim // d
    return min(m, n), max(m, n)


def factor_or_product(name: str, rows: int, cols: int, r: int, full: bool, zero: str | None,
                      device) -> dict[str, torch.Tensor]:
    """One Kronecker factor [rows, cols]: a full matrix `name`, or `name`_a [rows, r] ·
    `name`_b [r, cols]; the part named by `zero` ("full", "a", "b") starts at 0."""
    shapes = {name: (rows, cols)} if full else {f"{name}_a": (rows, r), f"{name}_b": (r, cols)}
    zeroed = {"full": name, "a": f"{name}_a", "b": f"{name}_b"}.get(zero)
    return {k: torch.zeros(s, device=device) if k == zeroed else he_uniform(*s, device=device)
            for k, s in shapes.items()}


class LokrAdapter(DeltaWeightAdapter):
    """lokr_w1 (or _a/_b) and lokr_w2 (or _a/_b), PEFT's names and shapes."""

    @property
    def rescale_rank_dropout(self) -> bool:
        return self.config.rank_dropout_scale

    def make_factors(self, r: int, device) -> dict[str, torch.Tensor]:
        config = self.config
        a, b = factorization(self.out_features, config.decompose_factor)
        c, d = factorization(self.in_features, config.decompose_factor)
        full1 = not (config.decompose_both and r < max(a, c) / 2)
        full2 = not r < max(b, d) / 2
        init = config.init_weights
        zero1 = None if init in (False, "lycoris") else ("full" if full1 else "a")
        zero2 = None if init != "lycoris" else ("full" if full2 else "b")
        return {**factor_or_product("lokr_w1", a, c, r, full1, zero1, device),
                **factor_or_product("lokr_w2", b, d, r, full2, zero2, device)}

    def side(self, name: str) -> torch.Tensor:
        if name in self.factor_names:
            return getattr(self, name)
        return getattr(self, f"{name}_a") @ getattr(self, f"{name}_b")

    def unscaled_delta(self) -> torch.Tensor:
        return torch.kron(self.side("lokr_w1"), self.side("lokr_w2"))

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """(W1 ⊗ W2)·x without building W1 ⊗ W2: x's features as a [c, d] grid, W1·grid·W2ᵀ
        is the [a, b] grid of the output's (a·c·b + c·d·b multiply-adds a token, not out·in)."""
        w1, w2 = self.side("lokr_w1"), self.side("lokr_w2")
        grid = x.to(w1.dtype).reshape(*x.shape[:-1], w1.shape[1], w2.shape[1])
        return (w1 @ (grid @ w2.t())).flatten(-2) * self.scaling


def new_lokr(config: LoKrConfig, path: str, in_features: int, out_features: int, *,
             r: int | None = None, alpha: float | None = None, device=None, dtype=None
             ) -> LokrAdapter:
    return LokrAdapter(in_features, out_features, config, r, alpha, device, dtype)


register(MethodRecord(
    name="lokr", config_class=LoKrConfig, peft_type="LOKR",
    files=FileSpec(LOKR_KINDS, peft_fields=factored_peft_fields), make_layer=new_lokr,
    has_rank=True))
