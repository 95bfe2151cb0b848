"""AdaLoRA: updates P·diag(E)·Q whose rank budget shrinks during training (PEFT's ADALORA format).

Each layer has `init_r` triplets (row i of A = P, E[i], column i of B = Q). `RankAllocator`
scores them by smoothed |w·grad| and, on a cubic schedule, zeroes the E of the least important
so the total rank falls from init_r × layers to target_r × layers. Pruned rows stay in the
tensors while training (the optimizer owns them); `saved_tensors()` drops them, as PEFT saves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loratune.adapters.host import AdapterHost, LayerAdapter
from loratune.adapters.lora import low_rank_fields
from loratune.adapters.peft_format import PeftFolder, file_key
from loratune.adapters.registry import (AdapterError, FileSpec, MethodRecord, ServingSpec,
                                        TrainingHooks, TrainingSpec, register)
from loratune.config import AdaLoraConfig


class AdaLoraAdapter(LayerAdapter):
    """A [r, in], E [r, 1], B [out, r] for one linear layer: ΔW = B·(A∘E)·scaling/ranknum."""

    def __init__(self, in_features: int, out_features: int, config: AdaLoraConfig, device=None,
                 dtype=None):
        super().__init__()
        self.config = config
        self.init_r = config.init_r
        # PEFT divides by the initial rank for good, also after pruning or loading fewer rows.
        self.ranknum = float(config.init_r)
        self.scaling = config.lora_alpha if config.lora_alpha > 0 else float(config.init_r)
        self.dropout = config.lora_dropout
        kw = {"device": device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.empty(self.init_r, in_features, **kw))
        self.lora_E = nn.Parameter(torch.zeros(self.init_r, 1, **kw))
        self.lora_B = nn.Parameter(torch.empty(out_features, self.init_r, **kw))
        nn.init.normal_(self.lora_A, std=0.02)
        nn.init.normal_(self.lora_B, std=0.02)
        # Which of the init_r triplets the allocator keeps (length init_r even once compacted).
        self.register_buffer("kept", torch.ones(self.init_r, dtype=torch.bool, device=device),
                             persistent=False)

    @property
    def r(self) -> int:
        return int(self.kept.sum())

    @property
    def compacted(self) -> bool:
        return self.lora_A.shape[0] != self.init_r

    def add_to(self, out: torch.Tensor, x: torch.Tensor, weight: float = 1.0,
               base: nn.Module | None = None, base_out: torch.Tensor | None = None
               ) -> torch.Tensor:
        """out + weight · x·(A∘E)ᵀ·Bᵀ·scaling/ranknum (dropout on x only, as PEFT)."""
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout, training=True)
        h = F.linear(x.to(self.lora_A.dtype), self.lora_A * self.lora_E)
        scale = weight * self.scaling / (self.ranknum + 1e-5)
        return out + (F.linear(h, self.lora_B) * scale).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """B·(A∘E)·scaling/ranknum in fp32."""
        ae = self.lora_A.float() * self.lora_E.float()
        return (self.lora_B.float() @ ae) * (self.scaling / (self.ranknum + 1e-5))

    def merge_into(self, w: torch.Tensor, bias: torch.Tensor | None, weight: float):
        return w + weight * self.delta_weight(), bias

    def unmerge_from(self, w: torch.Tensor, bias: torch.Tensor | None, weight: float):
        return w - weight * self.delta_weight(), bias

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """Live tensors by PEFT's key suffixes (PEFT does not save ranknum)."""
        return {"lora_A": self.lora_A, "lora_B": self.lora_B, "lora_E": self.lora_E}

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """Only the kept triplets (copies): what PEFT writes when the config has a rank_pattern."""
        if self.compacted:
            return self.file_tensors()
        keep = self.kept
        return {"lora_A": self.lora_A[keep], "lora_B": self.lora_B[:, keep],
                "lora_E": self.lora_E[keep]}

    def fit_file(self, path: str, tensors: dict[str, torch.Tensor], raw: dict) -> None:
        """Compact first when the file holds only the kept rows of `path` (as PEFT saves)."""
        kept = (raw.get("rank_pattern") or {}).get(f"{path}.lora_E")
        a = tensors.get("lora_A")
        if kept is not None and a is not None and a.shape[0] == sum(kept) != len(kept):
            self.set_kept(torch.tensor(kept, dtype=torch.bool, device=self.kept.device))
            self.compact()

    def set_kept(self, mask: torch.Tensor) -> None:
        """Record `mask` [init_r] as the kept triplets and zero the E of the others in place."""
        with torch.no_grad():
            self.kept.copy_(mask)
            if not self.compacted:
                self.lora_E.masked_fill_(~self.kept.view(-1, 1), 0.0)

    def compact(self) -> None:
        """Drop the pruned rows from the parameters (new Parameters: not while an optimizer holds
        the old ones). The output is unchanged because pruned E entries are zero."""
        for key, t in self.saved_tensors().items():
            setattr(self, key, nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad))


def adalora_modules(model: nn.Module, name: str) -> list[tuple[str, AdaLoraAdapter]]:
    """(module path, adapter) for every AdaLoRA adapter `name` in the model, in module order."""
    return [(path, mod.adapters[name]) for path, mod in model.named_modules()
            if isinstance(mod, AdapterHost) and name in mod.adapters
            and isinstance(mod.adapters[name], AdaLoraAdapter)]


def orthogonal_loss(model: nn.Module, name: str) -> torch.Tensor:
    """orth_reg_weight × mean over all P and Q of ||PPᵀ − I||_F and ||QᵀQ − I||_F (as PEFT:
    plain Frobenius norms, averaged over the 2 × modules matrices)."""
    mods = adalora_modules(model, name)
    if not mods:
        raise ValueError(f"model has no AdaLoRA adapter named '{name}'")
    terms = []
    for _, ad in mods:
        for cov in (ad.lora_A @ ad.lora_A.T, ad.lora_B.T @ ad.lora_B):
            eye = torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)
            terms.append(torch.linalg.matrix_norm(cov - eye))
    return mods[0][1].config.orth_reg_weight * torch.stack(terms).mean()


def _pattern(mods: list[tuple[str, AdaLoraAdapter]]) -> dict[str, list[bool]]:
    return {f"{path}.lora_E": ad.kept.tolist() for path, ad in mods}


def rank_pattern(model: nn.Module, name: str) -> dict[str, list[bool]]:
    """PEFT's rank_pattern: '<module path>.lora_E' -> kept mask over the init_r triplets."""
    return _pattern(adalora_modules(model, name))


def final_ranks(model: nn.Module, name: str) -> dict[str, int]:
    return {path: ad.r for path, ad in adalora_modules(model, name)}


def adalora_peft_config(config: AdaLoraConfig, pattern: dict[str, list[bool]] | None) -> dict:
    """The ADALORA fields of adapter_config.json. A rank_pattern with pruned entries means the
    weights file holds only the kept rows (`saved_tensors`); an all-kept pattern is left out."""
    pruned = pattern and not all(all(m) for m in pattern.values())
    # PEFT refuses an AdaLoRA config without a budgeting phase, even for inference.
    total = max(config.total_step or 0, config.tinit + config.tfinal + 1)
    keys = ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
            "lora_alpha", "lora_dropout", "target_modules", "bias", "init_lora_weights")
    return {"peft_type": "ADALORA", **{k: getattr(config, k) for k in keys}, "total_step": total,
            "rank_pattern": dict(pattern) if pruned else None}


def apply_rank_pattern(model: nn.Module, name: str, pattern: dict[str, list[bool]] | None,
                       weights: dict[str, torch.Tensor] | None = None) -> None:
    """Before loading a file: record its rank_pattern, and compact the modules whose tensors in
    `weights` hold only the kept rows (as PEFT saves them)."""
    if not pattern:
        return
    pattern = {k.removesuffix(f".{name}"): v for k, v in pattern.items()}
    mods = dict(adalora_modules(model, name))
    for key, mask in pattern.items():
        path = key.removesuffix(".lora_E")
        if path not in mods:
            raise ValueError(f"rank_pattern entry '{key}' names no AdaLoRA module of adapter "
                             f"'{name}' (expected '<module path>.lora_E')")
        ad = mods[path]
        if len(mask) != ad.init_r:
            raise ValueError(f"rank_pattern['{key}'] has {len(mask)} entries, expected init_r="
                             f"{ad.init_r}")
        ad.set_kept(torch.tensor(mask, dtype=torch.bool, device=ad.kept.device))
        stored = (weights or {}).get(file_key(path, "lora_E"))
        if stored is not None and stored.shape[0] == ad.r != ad.init_r:
            ad.compact()


class RankAllocator:
    """AdaLoRA's budget: call `update_and_allocate` after optimizer.step(), before zero_grad()."""

    def __init__(self, model: nn.Module, config: AdaLoraConfig, name: str = "default"):
        if config.total_step is None:
            raise ValueError("AdaLoRA needs adapter.total_step (the number of training steps)")
        if config.tinit >= config.total_step - config.tfinal:
            raise ValueError(f"AdaLoRA tinit={config.tinit} and tfinal={config.tfinal} leave no "
                             f"budgeting phase within total_step={config.total_step}")
        mods = adalora_modules(model, name)
        if not mods:
            raise ValueError(f"model has no AdaLoRA adapter named '{name}'")
        if any(ad.compacted for _, ad in mods):
            raise ValueError(f"adapter '{name}' was loaded with pruned rows; AdaLoRA can only "
                             "allocate ranks while training a full init_r adapter")
        self.config = config
        self.init_budget = sum(ad.init_r for _, ad in mods)
        self.target_budget = config.target_r * len(mods)
        self.ema_ipt: dict[tuple[str, str], torch.Tensor] = {}
        self.ema_unc: dict[tuple[str, str], torch.Tensor] = {}
        self.final: dict[str, list[bool]] | None = None
        self.last: dict[str, list[bool]] | None = None

    def budget(self, step: int) -> tuple[int, bool]:
        """(total kept rank at `step`, whether to mask at this step): PEFT's cubic schedule."""
        c = self.config
        if step <= c.tinit:
            return self.init_budget, False
        if step > c.total_step - c.tfinal:
            return self.target_budget, True
        frac = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.init_budget - self.target_budget) * frac**3 + self.target_budget)
        return budget, step % c.deltaT == 0

    def _update_importance(self, mods: list[tuple[str, AdaLoraAdapter]]) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        with torch.no_grad():
            for path, ad in mods:
                for key, p in ad.file_tensors().items():
                    if p.grad is None:
                        raise ValueError(f"AdaLoRA: {path}.{key} has no gradient; call "
                                         "update_and_allocate after backward, before zero_grad")
                    ipt = (p * p.grad).abs()
                    ema = self.ema_ipt.get((path, key), torch.zeros_like(p)) * b1 + (1 - b1) * ipt
                    unc = self.ema_unc.get((path, key), torch.zeros_like(p)) * b2
                    self.ema_ipt[path, key] = ema
                    self.ema_unc[path, key] = unc + (1 - b2) * (ipt - ema).abs()

    def _scores(self, path: str, ad: AdaLoraAdapter) -> torch.Tensor:
        """One score per triplet: E's score plus the mean scores of its A row and B column."""
        if (path, "lora_E") not in self.ema_ipt:  # nothing measured (e.g. resumed late): |E|
            return ad.lora_E.detach().abs().view(-1).float()
        s = {k: (self.ema_ipt[path, k] * self.ema_unc[path, k]).float()
             for k in ("lora_A", "lora_E", "lora_B")}
        return s["lora_E"].view(-1) + s["lora_A"].mean(dim=1) + s["lora_B"].mean(dim=0)

    def _mask_to(self, mods: list[tuple[str, AdaLoraAdapter]], budget: int) -> dict:
        scores = [self._scores(path, ad) for path, ad in mods]
        flat = torch.cat([s.cpu() for s in scores])
        keep = torch.zeros_like(flat, dtype=torch.bool)
        # Exactly `budget` survive, even among ties (PEFT's threshold `<=` would drop every tie).
        keep[flat.topk(min(budget, flat.numel())).indices] = True
        start = 0
        for (_, ad), s in zip(mods, scores):
            ad.set_kept(keep[start:start + s.numel()].to(ad.kept.device))
            start += s.numel()
        return _pattern(mods)

    def update_and_allocate(self, model: nn.Module, name: str, step: int) -> dict | None:
        """Update importance, mask to the step's budget; returns the rank pattern if it changed."""
        mods = adalora_modules(model, name)
        end = self.config.total_step - self.config.tfinal
        if step < end:
            self._update_importance(mods)
            budget, due = self.budget(step)
            pattern = self._mask_to(mods, budget) if due else self.last
        elif self.final is None:  # the last allocation, at target_r × modules, then fixed
            self.final = pattern = self._mask_to(mods, self.target_budget)
            self.ema_ipt.clear()
            self.ema_unc.clear()
        else:  # the optimizer may have moved pruned E entries off zero
            for _, ad in mods:
                ad.set_kept(ad.kept.clone())
            pattern = self.final
        changed = pattern is not None and pattern != self.last
        self.last = pattern
        return pattern if changed else None

    def state(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        """The averages, each module's kept mask, and whether the final allocation was made."""
        out = {f"{kind}.{path}.{key}": t for kind, ema in (("ema_ipt", self.ema_ipt),
                                                           ("ema_unc", self.ema_unc))
               for (path, key), t in ema.items()}
        out.update({f"kept.{path}": ad.kept for path, ad in adalora_modules(model, name)})
        out["final"] = torch.tensor(self.final is not None)
        out["last"] = torch.tensor(self.last is not None)
        return out

    def load_state(self, model: nn.Module, name: str, tensors: dict[str, torch.Tensor],
                   where) -> None:
        mods = dict(adalora_modules(model, name))
        if "final" not in tensors or set(mods) != {k[5:] for k in tensors if
                                                   k.startswith("kept.")}:
            raise AdapterError(f"{where}: expected AdaLoRA's rank allocator state (hooks.kept.* "
                               f"for the {len(mods)} modules of adapter '{name}', hooks.final)")
        for path, ad in mods.items():
            ad.set_kept(tensors[f"kept.{path}"].to(device=ad.kept.device, dtype=torch.bool))
        device = next(iter(mods.values())).kept.device
        for kind, ema in (("ema_ipt", self.ema_ipt), ("ema_unc", self.ema_unc)):
            ema.clear()
            for key, t in tensors.items():
                if key.startswith(f"{kind}."):
                    path, part = key[len(kind) + 1:].rsplit(".", 1)
                    ema[path, part] = t.to(device)
        pattern = _pattern(list(mods.items()))
        self.final = pattern if bool(tensors["final"]) else None
        self.last = pattern if bool(tensors.get("last", tensors["final"])) else None


class AdaLoraHooks(TrainingHooks):
    """The orthogonality loss once per step, then the rank budget after each optimizer step."""

    def __init__(self, model: nn.Module, config: AdaLoraConfig, name: str, total_steps: int):
        if config.total_step is None:
            config = config.model_copy(update={"total_step": total_steps})
            for _, ad in adalora_modules(model, name):  # the saved config must name it too
                ad.config = config
        self.model, self.name = model, name
        self.allocator = RankAllocator(model, config, name)

    def step_loss(self) -> torch.Tensor:
        return orthogonal_loss(self.model, self.name)

    def after_step(self, step: int) -> None:
        self.allocator.update_and_allocate(self.model, self.name, step)

    def state(self) -> dict[str, torch.Tensor]:
        return self.allocator.state(self.model, self.name)

    def load_state(self, tensors: dict[str, torch.Tensor], where) -> None:
        self.allocator.load_state(self.model, self.name, tensors, where)

    def summary(self) -> dict:
        ranks = final_ranks(self.model, self.name)
        return {"final_ranks": ranks, "total_rank": sum(ranks.values())}


def new_adalora(config: AdaLoraConfig, path: str, in_features: int, out_features: int, *,
                r: int | None = None, alpha: float | None = None, device=None, dtype=None
                ) -> AdaLoraAdapter:
    return AdaLoraAdapter(in_features, out_features, config, device=device, dtype=dtype)


def adalora_peft_fields(model: nn.Module, name: str, config: AdaLoraConfig,
                        compact: bool = True) -> dict:
    pattern = rank_pattern(model, name) if compact else None
    return {**low_rank_fields(model, name, config), **adalora_peft_config(config, pattern)}


def before_load(model: nn.Module, name: str, raw: dict, weights: dict) -> None:
    apply_rank_pattern(model, name, raw.get("rank_pattern"), weights)


def adalora_factors(adapter: PeftFolder) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, A∘E [r, in] and B·scaling/ranknum [out, r] in float32: AdaLoRA's update as
    the LoRA product (the kept triplets only, as saved)."""
    config = adapter.config
    scale = (config.lora_alpha if config.lora_alpha > 0 else float(config.init_r)) / (
        float(config.init_r) + 1e-5)
    out = {}
    for path, parts in adapter.modules().items():
        missing = [k for k in ("lora_A", "lora_E", "lora_B") if k not in parts]
        if missing:
            raise AdapterError(f"{adapter.weights_path}: {file_key(path, missing[0])} is missing "
                               "(an AdaLoRA layer has lora_A, lora_E and lora_B)")
        a, e, b = (parts[k].float() for k in ("lora_A", "lora_E", "lora_B"))
        out[path] = (a * e.view(-1, 1), b * scale)
    return out


register(MethodRecord(
    name="adalora", config_class=AdaLoraConfig, peft_type="ADALORA",
    files=FileSpec(("lora_A", "lora_B", "lora_E"), peft_fields=adalora_peft_fields,
                   before_load=before_load),
    make_layer=new_adalora,
    # Its allocator scores importance from each step's gradients and its orthogonality loss is
    # backpropagated outside the model's forward.
    training=TrainingSpec(hooks=AdaLoraHooks,
                          why_single_process="its rank budget is a global per-step state"),
    serving=ServingSpec(factors=adalora_factors)))
