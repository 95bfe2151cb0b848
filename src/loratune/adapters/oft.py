"""OFT: orthogonal fine-tuning (Qiu et al. 2023; PEFT's OFT as of version 0.18).

A layer's input is turned by a block-diagonal matrix R = diag(R_1 … R_k) before the frozen
weight: out = base(x·R), i.e. W' = W·Rᵀ. Each block R_i is the Cayley transform of a trained
skew-symmetric Q_i (stored as its upper triangle, `oft_R.weight` [k, b(b−1)/2]), so R stays
(nearly) orthogonal and keeps the angles between the weight's neurons. Q = 0 at the start: a
fresh adapter changes nothing. Not a low-rank add-on: the adapter hooks the layer's input
(`scale_input`), as IA³ does for feed-forward layers, and merging multiplies W by Rᵀ.

Weighted use (`set_active({name: w})`) turns by the transform of w·Q: w = 0 is the base, w = 1
the trained adapter, and every step between stays a rotation (invertible, so unmerge is exact).
"""

from __future__ import annotations

import math
import re
import warnings

import torch
from torch import nn

from loratune.adapters.host import LayerAdapter, leaf_names
from loratune.adapters.registry import (AdapterError, FileSpec, MethodRecord, TrainingSpec,
                                        register)
from loratune.config import OFTConfig

# The PEFT release whose OFT this file follows: the Neumann series changed in 0.18, and PEFT
# warns about files without a version at or above it (ours follow 0.18's).
PEFT_FORMAT = "0.18.0"


def nearest_divisor(n: int, want: int) -> int:
    """The divisor of n nearest to `want` (the lower one on a tie), as PEFT adjusts an r or
    oft_block_size that does not divide a layer's input width."""
    if want >= n:
        return n
    higher = want
    while n % higher:
        higher += 1
    lower = want
    while lower > 1 and n % lower:
        lower -= 1
    return lower if want - lower <= higher - want else higher


def block_layout(config: OFTConfig, in_features: int, path: str) -> tuple[int, int]:
    """(blocks, block size) of the layer at `path`: r × size = in_features."""
    given, name = ((config.r, "r") if config.r else (config.oft_block_size, "oft_block_size"))
    value = given
    if in_features % given or given > in_features:
        value = nearest_divisor(in_features, given)
        warnings.warn(f"{path}: {name}={given} does not divide its input width {in_features}; "
                      f"using {value} there (as PEFT does)", stacklevel=3)
    if config.r:
        return value, in_features // value
    return in_features // value, value


def skew(vec: torch.Tensor, size: int) -> torch.Tensor:
    """[k, size(size−1)/2] upper triangles (row by row) -> [k, size, size] matrices Q − Qᵀ."""
    rows, cols = torch.triu_indices(size, size, 1, device=vec.device)
    upper = vec.new_zeros(vec.shape[0], size, size)
    upper[:, rows, cols] = vec
    return upper - upper.transpose(-2, -1)


def cayley(q: torch.Tensor, exact: bool, terms: int) -> torch.Tensor:
    """PEFT's two transforms of skew-symmetric q [k, b, b]. Exact: (I − Q)(I + Q)⁻¹. Neumann:
    (I + Q)(I − Q)⁻¹ ≈ I + 2Q + 2Q² + … + 2Q^(n−2) + Q^(n−1) for n terms. (The two turn
    opposite ways, and PEFT's series stops at Q³ for 3 terms as for 4; both kept as PEFT has
    them, since files trained either way must load unchanged.)"""
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype).expand_as(q)
    if exact:
        return torch.linalg.solve(eye + q, eye - q, left=False)
    if terms < 2:
        return eye.clone()
    rot = eye + 2 * q
    if terms > 2:
        power = q @ q
        rot = rot + 2 * power
        for _ in range(3, terms - 1):
            power = power @ q
            rot = rot + 2 * power
        rot = rot + power @ q
    return rot


class OftAdapter(LayerAdapter):
    """One layer's generators `oft_R` [blocks, b(b−1)/2] (1 row with block_share)."""

    def __init__(self, in_features: int, config: OFTConfig, path: str = "", device=None,
                 dtype=None):
        super().__init__()
        self.config = config
        self.blocks, self.block_size = block_layout(config, in_features, path)
        rows = 1 if config.block_share else self.blocks
        n = self.block_size * (self.block_size - 1) // 2
        self.oft_R = nn.Parameter(torch.zeros(rows, n, device=device, dtype=dtype))
        if not config.init_weights:
            nn.init.normal_(self.oft_R, mean=0.0, std=0.1)

    @property
    def r(self) -> int:
        return self.blocks

    def constrain(self) -> None:
        """COFT, as PEFT applies it at every use: each block's ‖Q − Qᵀ‖_F is pulled back to at
        most eps/√(rows) (the stored triangle rescaled in place, outside autograd)."""
        with torch.no_grad():
            radius = self.config.eps / math.sqrt(self.oft_R.shape[0])
            norm = math.sqrt(2) * torch.linalg.vector_norm(self.oft_R, dim=1, keepdim=True)
            self.oft_R.copy_(torch.where(norm <= radius, self.oft_R, self.oft_R * (radius / norm)))

    def rotations(self, weight: float = 1.0) -> torch.Tensor:
        """The blocks R_i [blocks, b, b] in fp32 for weighted use `weight`."""
        if self.config.coft:
            self.constrain()
        q = skew(self.oft_R.float() * weight if weight != 1.0 else self.oft_R.float(),
                 self.block_size)
        rot = cayley(q, not self.config.use_cayley_neumann, self.config.num_cayley_neumann_terms)
        return rot.expand(self.blocks, -1, -1) if self.config.block_share else rot

    def drop_blocks(self, rot: torch.Tensor) -> torch.Tensor:
        """module_dropout in training: int(p·blocks) random blocks become the identity."""
        p, k = self.config.module_dropout, rot.shape[0]
        if not (self.training and p > 0):
            return rot
        keep = torch.ones(k, device=rot.device, dtype=rot.dtype)
        keep[torch.randperm(k, device=rot.device)[:int(p * k)]] = 0
        eye = torch.eye(rot.shape[-1], device=rot.device, dtype=rot.dtype)
        return keep.view(k, 1, 1) * rot + (1 - keep).view(k, 1, 1) * eye

    def scale_input(self, x: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        """x·R, block by block (the base layer then sees the turned input)."""
        rot = self.drop_blocks(self.rotations(weight)).to(self.oft_R.dtype)
        parts = x.to(rot.dtype).reshape(*x.shape[:-1], self.blocks, self.block_size)
        return torch.einsum("...rk,rkc->...rc", parts, rot).reshape(x.shape).to(x.dtype)

    def add_to(self, out: torch.Tensor, x: torch.Tensor, weight: float = 1.0,
               base: nn.Module | None = None, base_out: torch.Tensor | None = None
               ) -> torch.Tensor:
        return out  # all of OFT happens to the input (scale_input)

    def matrix(self, weight: float) -> torch.Tensor:
        """R = diag(R_1 … R_k) [in, in] in fp32, without a gradient."""
        with torch.no_grad():
            return torch.block_diag(*self.rotations(weight))

    def merge_into(self, w: torch.Tensor, bias: torch.Tensor | None, weight: float):
        return w @ self.matrix(weight).T, bias

    def unmerge_from(self, w: torch.Tensor, bias: torch.Tensor | None, weight: float):
        # Solved, not multiplied by R: the Neumann series is orthogonal only nearly.
        return torch.linalg.solve(self.matrix(weight).T, w, left=False), bias

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {"oft_R.weight": self.oft_R}


def new_oft(config: OFTConfig, path: str, in_features: int, out_features: int, *,
            r: int | None = None, alpha: float | None = None, device=None, dtype=None
            ) -> OftAdapter:
    return OftAdapter(in_features, config, path, device=device, dtype=dtype)


def oft_peft_fields(model: nn.Module, name: str, config: OFTConfig, compact: bool = True) -> dict:
    return {"target_modules": leaf_names(model, name, config.target_modules),
            "fan_in_fan_out": False, "exclude_modules": None, "layers_to_transform": None,
            "layers_pattern": None, "peft_version": PEFT_FORMAT}


def loaded_options(values: dict) -> dict:
    """PEFT before 0.14 wrote OFT without oft_block_size, in a layout PEFT itself no longer
    reads; refused as PEFT refuses it."""
    if "oft_block_size" not in values:
        raise AdapterError("adapter_config.json: an OFT adapter without oft_block_size was "
                           "written by PEFT before 0.14, whose OFT weights do not fit PEFT 0.14 "
                           "and later (nor loratune); retrain it")
    return values


def warn_old_series(model: nn.Module, name: str, raw: dict, weights: dict) -> None:
    """A file trained with PEFT's Neumann series before 0.18 loads, but turns slightly
    otherwise than it did there (PEFT warns the same)."""
    if not raw.get("use_cayley_neumann", True):
        return
    found = re.match(r"(\d+)\.(\d+)", str(raw.get("peft_version") or "0.0"))
    if (int(found[1]), int(found[2])) < (0, 18):
        warnings.warn(f"OFT adapter '{name}' uses the Cayley-Neumann series of a PEFT before "
                      f"0.18 (peft_version {raw.get('peft_version')!r}); it was changed in 0.18, "
                      "so its outputs differ slightly from training. Retrain to be exact",
                      stacklevel=2)


PLAN_BLOCK = 32  # the block width the planner assumes when a config gives r blocks instead


def plan_rank(config: OFTConfig) -> int:
    """The LoRA rank that trains as many values as OFT on a square layer of width d: OFT trains
    b(b−1)/2 per block, d/b blocks (one with block_share); LoRA of rank R trains 2·R·d."""
    b = config.oft_block_size or PLAN_BLOCK
    return 1 if config.block_share else max(1, math.ceil((b - 1) / 4))


register(MethodRecord(
    name="oft", config_class=OFTConfig, peft_type="OFT",
    files=FileSpec(("oft_R.weight",), peft_fields=oft_peft_fields, loaded_options=loaded_options,
                   before_load=warn_old_series),
    make_layer=new_oft,
    training=TrainingSpec(plan_rank=plan_rank, plan_note=(
        "estimated as LoRA of rank ⌈(b−1)/4⌉, which trains as many values as OFT's blocks of "
        f"width b on a square layer (with r blocks given, b is taken as {PLAN_BLOCK})"))))
