"""The streamed merge's part for adapters on fused experts (adapters/expert_lora.py).

Each expert's update s·B_e·A_e is added to its slice of the base: a checkpoint that stores the
experts fused (`experts.gate_up_proj [E, 2I, H]`, `experts.down_proj [E, H, I]`; GPT-OSS's
[E, H, 2I] and [E, I, H], which take the update transposed) gets every expert at once; one that
stores them one matrix per expert, as transformers' save_pretrained writes them
(`experts.<e>.gate_proj/up_proj/down_proj.weight`, Mixtral's
`block_sparse_moe.experts.<e>.w1/w3/w2.weight`), gets expert e's rows of the fused update. The
update is computed by the method's own experts adapter (`make_experts`, its `delta`).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from loratune.adapters.expert_lora import experts_adapter
from loratune.adapters.peft_format import ANOTHER_BASE, PeftFolder
from loratune.adapters.registry import AdapterError
from loratune.models.moe_experts import per_expert_key

EXPERT_PARAMS = ("gate_up_proj", "down_proj")  # as ExpertLora adapts them, in its order
_FUSED = re.compile(r"(.+\.experts)\.(gate_up_proj|down_proj)")
# Per-expert matrix -> (fused parameter, which half of its rows: 0 gate, 1 up, None all)
_PARTS = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
          "down_proj": ("down_proj", None)}


def expert_slot(name: str) -> tuple[str, str, int | None, int | None] | None:
    """(experts module path as the model names it, fused parameter, expert or None when the
    tensor holds all of them, row half or None) of a checkpoint tensor; None for any other."""
    m = _FUSED.fullmatch(name)
    if m:
        return m[1], m[2], None, None
    key = per_expert_key(name)
    if key is None:
        return None
    path, expert, part = key
    param, half = _PARTS[part]
    return path, param, expert, half


# The other half of an expert's gate/up pair in a per-expert checkpoint.
_SIBLING = {"gate_proj": "up_proj", "up_proj": "gate_proj", "w1": "w3", "w3": "w1"}


def expert_round_trip(name: str, tensor: torch.Tensor, read, rounded,
                      transposed: bool = False) -> torch.Tensor:
    """Checkpoint tensor `name` of routed experts after the 4-bit round trip QLoRA's
    QuantizedExperts gives it (`rounded`: one matrix's quantize-dequantize): one [out, in]
    matrix per expert, an expert's gate and up rows quantized together as its gate_up_proj
    (`read(sibling)` fetches the other half of a per-expert checkpoint)."""
    _, _, expert, half = expert_slot(name)
    if expert is None:  # fused [E, out, in] (GPT-OSS: [E, in, out])
        return torch.stack([rounded(w.t()).t() if transposed else rounded(w) for w in tensor])
    if half is None:
        return rounded(tensor)
    head, leaf, tail = name.rsplit(".", 2)
    other = read(f"{head}.{_SIBLING[leaf]}.{tail}")
    pair = [tensor, other] if half == 0 else [other, tensor]
    return rounded(torch.cat([t.float() for t in pair])).chunk(2)[half]


class ExpertMerge:
    """Folds the adapters' fused-experts updates into checkpoint tensors as they stream by; the
    updates of one experts module are kept while its tensors pass (about one layer).
    `transposed()`: experts module path -> stored [E, in, out] (GPT-OSS), asked only when an
    adapter holds experts (its shapes cannot tell: GPT-OSS's down_proj [E, I, H] is square
    when I == H, as in gpt-oss-20b)."""

    def __init__(self, adapters: list, names: list[str], base: str,
                 transposed: Callable[[], dict[str, bool]] = dict):
        self.adapters = [(a, a.expert_modules()) for a in adapters]
        self.base, self.cache = base, {}
        self.transposed = transposed() if any(p for _, p in self.adapters) else {}
        found = {s[0] for n in names if (s := expert_slot(n)) is not None}
        for a, parts in self.adapters:
            missing = sorted(set(parts) - found)
            if missing:
                raise AdapterError(f"{a.folder}: adapts the fused experts {missing[0]}, which "
                                   f"{base} does not have ({ANOTHER_BASE})")
        self.paths = {p for _, parts in self.adapters for p in parts}

    def owns(self, name: str) -> bool:
        slot = expert_slot(name)
        return slot is not None and slot[0] in self.paths

    def merge(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` (checkpoint tensor `name`) with every adapter's update on it, in float32."""
        path, param, expert, half = expert_slot(name)
        out = tensor.float()
        for delta in self._deltas(path):
            d = delta[param] if expert is None else delta[param][expert]
            if half is not None:
                d = d.chunk(2, dim=-2)[half]
            if d.shape != out.shape:
                raise AdapterError(f"{self.base}: {name} has shape {tuple(out.shape)}, but the "
                                   f"adapter's update of {path}.{param} gives "
                                   f"{tuple(d.shape)} ({ANOTHER_BASE})")
            out = out + d
        return out

    def _deltas(self, path: str) -> list[dict[str, torch.Tensor]]:
        if path not in self.cache:
            flip = self.transposed.get(path, False)
            self.cache = {path: [expert_deltas(a, path, parts[path], flip) for a, parts in
                                 self.adapters if path in parts]}
        return self.cache[path]


def expert_deltas(adapter: PeftFolder, path: str, parts: dict,
                  transposed: bool = False) -> dict[str, torch.Tensor]:
    """{fused parameter: weight·s·B_e·A_e [E, out, in]} of one adapter's experts at `path`
    (its transpose [E, in, out] for experts stored so), from the file's tensors (`parts`, by
    ExpertLora's kinds) in the method's own adapter."""
    ad = experts_adapter(adapter, path, parts)
    weight = getattr(adapter, "weight", 1.0)
    with torch.no_grad():
        deltas = {param: ad.delta(param) * weight for param in EXPERT_PARAMS}
    return {p: d.transpose(1, 2) if transposed else d for p, d in deltas.items()}
