"""LoRA on routed experts held as fused 3-D parameters (transformers 5's Qwen3-MoE, Mixtral,
OLMoE, DeepSeek, GPT-OSS).

Those models keep every expert of a layer in one module (`mlp.experts`) with
`gate_up_proj [E, 2I, H]` and `down_proj [E, H, I]` (GPT-OSS: stored transposed, [E, H, 2I] and
[E, I, H], with per-expert biases, gate/up interleaved by column and a clamped SwiGLU): no linear
layer exists per expert, so `all-linear` never sees them. `ExpertHost` takes the experts module's
place and runs the same math as transformers' experts forward with tokens grouped per expert
(models/grouped_experts.py), adding, for the rows routed to expert e, x·A_eᵀ·B_eᵀ·s to that
expert's projection in the same grouping; the model is never unfused.

The tensors are kept in PEFT 0.21's `target_parameters` layout (ParamWrapper), so a file is a
plain copy: per parameter `lora_A.weight [E·r, in]` (expert-major: row e·r+k is A_e[k]) and
`lora_B.weight [out, r·E]` (rank-major: column k·E+e is B_e[:, k]), `in`/`out` those of the
projection (ParamWrapper reads a transposed [E, in, out] parameter as such, and its delta there is
(s·B_e·A_e)ᵀ, which is what merge writes into GPT-OSS's tensors). PEFT nests one wrapper per
parameter, the first parameter of the module innermost, so `gate_up_proj`'s tensors sit under
`experts.base_layer.` and `down_proj`'s under `experts.`.
"""

from __future__ import annotations

import math
import re
import warnings
from types import SimpleNamespace

import torch
from torch import nn

from loratune.adapters.host import AdapterHost
from loratune.adapters.peft_format import (CONFIG_NAME, EXPERT_TARGETS, PeftFolder, file_key,
                                           lora_scale)
from loratune.adapters.registry import AdapterError, RowBlock, method_record
from loratune.models.grouped_experts import LowRank, add_low_rank, experts_forward, grouped_linear
from loratune.models.moe_experts import (QuantizedExperts, add_expert_bias, expert_glu,
                                         out_in)

# The parameters adapted, in the experts module's own order (PEFT's nesting follows it).
EXPERT_PARAMS = ("gate_up_proj", "down_proj")
# The router beside the experts: `gate` (Qwen3-MoE, Mixtral, OLMoE, DeepSeek), `router` (GPT-OSS).
ROUTER_NAMES = ("gate", "router")
_KINDS = {"gate_up_proj": ("base_layer.lora_A.weight", "base_layer.lora_B.weight"),
          "down_proj": ("lora_A.weight", "lora_B.weight")}


def is_fused_experts(module: nn.Module) -> bool:
    """Experts held as fused 3-D parameters whose gate/up activation we know (models/
    moe_experts.py expert_glu: act_fn, or GPT-OSS's clamped SwiGLU), stored [E, out, in] or,
    as GPT-OSS does, [E, in, out] with biases; or such experts in 4 bits (QLoRA's
    QuantizedExperts). Experts of any other kind are named by `unsupported_experts`."""
    if isinstance(module, QuantizedExperts):
        return True  # built only for the layouts above
    params = [getattr(module, p, None) for p in EXPERT_PARAMS]
    return (all(isinstance(p, nn.Parameter) and p.dim() == 3 for p in params)
            and expert_glu(module) is not None)


def _is_experts(module: nn.Module) -> bool:
    """Routed experts of any layout: fused 3-D parameters or their 4-bit replacement."""
    gate_up = getattr(module, "gate_up_proj", None)
    return isinstance(module, QuantizedExperts) or (
        isinstance(gate_up, nn.Parameter) and gate_up.dim() == 3)


def expert_module_paths(model: nn.Module) -> list[str]:
    """Paths of the fused experts modules, as the model names them: an experts module that
    already hosts an adapter is found at its host's path (a second adapter joins it)."""
    hosts = {p for p, m in model.named_modules() if isinstance(m, ExpertHost)}
    return [p for p, m in model.named_modules()
            if p in hosts and is_fused_experts(m.base_layer)
            or is_fused_experts(m) and p.removesuffix(".base_layer") not in hosts]


def unsupported_experts(model: nn.Module) -> list[str]:
    """Paths of expert modules with an activation we do not know: refused by name."""
    return [p for p, m in model.named_modules() if _is_experts(m) and not is_fused_experts(m)]


def expert_shapes(experts) -> dict[str, tuple[int, int, int]]:
    """(experts, out, in) of each adapted parameter, from the fused tensors or, in 4 bits, from
    one expert's [out, in] matrix."""
    if isinstance(experts, QuantizedExperts):
        return {n: (experts.num_experts, getattr(experts, n)[0].out_features,
                    getattr(experts, n)[0].in_features) for n in EXPERT_PARAMS}
    return {n: tuple(out_in(experts, n).shape) for n in EXPERT_PARAMS}


def experts_placement(experts: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and compute dtype of an experts module (a 4-bit one computes in compute_dtype)."""
    if isinstance(experts, QuantizedExperts):
        return experts.gate_up_proj[0].packed.device, experts.compute_dtype
    return experts.gate_up_proj.device, experts.gate_up_proj.dtype


def all_linear_note(model: nn.Module) -> str | None:
    """The one line `all-linear` owes a model with fused experts; None when it has none."""
    paths = expert_module_paths(model) + unsupported_experts(model)
    if not paths:
        return None
    return (f"all-linear: {len(paths)} routed-expert modules (e.g. {paths[0]}) hold their experts "
            f"as fused 3-D parameters ({', '.join(EXPERT_PARAMS)}), which are not linear layers "
            "and are not included; add 'experts' to adapter.target_modules to adapt them")


def _named(target, name: str) -> bool:
    return isinstance(target, list) and name in target


def expert_targets(model: nn.Module, target: list[str] | str) -> list[str]:
    """Paths of the fused experts modules `target` names: 'experts' in a list, or a regex that
    matches their path. Experts of a layout we do not rerun are refused by name, not skipped."""
    odd = [p for p in unsupported_experts(model) if _matches(p, target)]
    if odd:
        kind = type(model.get_submodule(odd[0])).__name__
        raise AdapterError(f"target_modules names {odd[0]} ({kind}), whose gate/up activation "
                           "loratune does not know (an act_fn, or GPT-OSS's alpha/limit); LoRA "
                           "on these experts is not supported")
    return [p for p in expert_module_paths(model) if _matches(p, target)]


def _matches(path: str, target) -> bool:
    if isinstance(target, str):
        return target != "all-linear" and re.fullmatch(target, path) is not None
    return any(path == t or path.endswith("." + t) for t in target)


def group_targets(model: nn.Module, target, candidates: list[str]) -> list[str]:
    """Linear layers picked by the MoE group names of a target_modules list: 'shared_experts'
    (every linear inside a shared-expert MLP) and 'router' (the experts' router, when it is a
    linear layer; a router held as a bare weight is refused, pointing at modules_to_save)."""
    picked = []
    if _named(target, "shared_experts"):
        picked += [c for c in candidates if re.search(r"\.shared_experts?\.", c)]
    if _named(target, "router"):
        for path in _router_paths(model):
            if path not in candidates:
                kind = type(model.get_submodule(path)).__name__
                raise AdapterError(
                    f"target_modules names 'router', and the router {path} is a {kind}, not a "
                    "linear layer: LoRA cannot adapt it. Train it whole with "
                    f"adapter.modules_to_save: ['{path.rsplit('.', 1)[-1]}'] instead")
            picked.append(path)
    return picked


def _router_paths(model: nn.Module) -> list[str]:
    """The router beside each experts module (`gate` in Qwen3-MoE/Mixtral/OLMoE, or `router`)."""
    paths = []
    for path in expert_module_paths(model) + unsupported_experts(model):
        parent = path.rpartition(".")[0]
        for leaf in ROUTER_NAMES:
            full = f"{parent}.{leaf}" if parent else leaf
            if _has_module(model, full):
                paths.append(full)
    return paths


def _has_module(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


class ExpertLora(nn.Module):
    """One adapter's per-expert A/B for both fused parameters, in PEFT's file layout."""

    def __init__(self, experts: nn.Module, config, r: int, alpha: float, device=None,
                 dtype=None):
        super().__init__()
        if config.lora_dropout:
            # x·A·B cannot be factored out of a dropout on x; PEFT refuses it too
            raise AdapterError(f"adapter.lora_dropout={config.lora_dropout}: LoRA on fused "
                               "experts ('experts' in target_modules) needs lora_dropout 0")
        self.config, self.r, self.alpha = config, r, alpha
        shapes = expert_shapes(experts)
        self.num_experts = shapes["gate_up_proj"][0]
        self.scaling = lora_scale(alpha, r, config.use_rslora)
        kw = {"device": device, "dtype": dtype}
        for name in EXPERT_PARAMS:
            n_exp, out_f, in_f = shapes[name]
            a = nn.Parameter(torch.empty(n_exp * r, in_f, **kw))
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as PEFT's lora_A (an nn.Linear)
            self.register_parameter(f"{name}_A", a)
            self.register_parameter(f"{name}_B", nn.Parameter(torch.zeros(out_f, r * n_exp, **kw)))

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A [E, r, in] and B [E, out, r] of parameter `name` (views of the live tensors)."""
        a, b = getattr(self, f"{name}_A"), getattr(self, f"{name}_B")
        return (a.view(self.num_experts, self.r, a.shape[-1]),
                b.view(b.shape[0], self.r, self.num_experts).permute(2, 0, 1))

    def low_rank(self, name: str, weight: float = 1.0) -> LowRank:
        """Parameter `name`'s per-expert term, as the grouped experts forward adds it."""
        a, b = self.factors(name)
        return LowRank(a, b, self.scaling * weight)

    def delta(self, name: str) -> torch.Tensor:
        """s·B_e·A_e for every expert, [E, out, in] in fp32 (what merge adds)."""
        a, b = self.factors(name)
        return torch.bmm(b.float(), a.float()) * self.scaling

    def file_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, (a_kind, b_kind) in _KINDS.items():
            out[a_kind], out[b_kind] = getattr(self, f"{name}_A"), getattr(self, f"{name}_B")
        return out


class ExpertHost(AdapterHost):
    """Stands where the experts module was; calls it as is with no adapter running, else runs
    its math with the running adapters added, tokens grouped per expert
    (models/grouped_experts.py)."""

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.merged: dict[str, float] = {}
        self.grouping = "auto"  # models/grouped_experts.py BACKENDS

    def running(self) -> list[tuple[ExpertLora, float]]:
        if self.disabled:
            return []
        return [(self.adapters[n], w) for n, w in self.active.items()
                if n in self.adapters and n not in self.merged]

    def forward(self, hidden_states, top_k_index, top_k_weights):
        running = self.running()
        if not running:
            return self.base_layer(hidden_states, top_k_index, top_k_weights)
        return run_experts(self.base_layer, lambda name: [ad.low_rank(name, weight)
                                                          for ad, weight in running],
                           hidden_states, top_k_index, top_k_weights, self.grouping)

    def file_tensors(self, name: str, path: str) -> dict[str, torch.Tensor]:
        return {file_key(path, k): t for k, t in self.adapters[name].file_tensors().items()}

    def _rewrite(self, name: str, weight: float, sign: float) -> None:
        if isinstance(self.base_layer, QuantizedExperts):
            # re-rounding 4-bit experts would change the base (as for a Linear4bit)
            raise ValueError("cannot merge into 4-bit experts (QuantizedExperts) in place; merge "
                             "into the full-precision base: loratune merge --qlora nf4")
        with torch.no_grad():
            for pname in EXPERT_PARAMS:
                param = out_in(self.base_layer, pname)  # GPT-OSS's: a transposed view
                new = param.float() + sign * weight * self.adapters[name].delta(pname)
                param.copy_(new.to(param.dtype))

    def merge(self, names: dict[str, float] | None = None) -> None:
        for name, weight in (self.active if names is None else names).items():
            if name in self.adapters and name not in self.merged:
                self._rewrite(name, weight, 1.0)
                self.merged[name] = weight

    def unmerge(self) -> None:
        for name, weight in reversed(list(self.merged.items())):
            self._rewrite(name, weight, -1.0)
            del self.merged[name]


def run_experts(base: nn.Module, terms, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor, grouping: str = "auto") -> torch.Tensor:
    """The experts module `base` (fused, or QLoRA's 4-bit experts) on routed tokens with the
    per-expert low-rank terms `terms(name)` (a list of LowRank) added in its grouping."""
    quantized = isinstance(base, QuantizedExperts)

    def project(name: str, x: torch.Tensor, groups) -> torch.Tensor:
        y = base.project(name, x, groups) if quantized else \
            _fused_project(base, name, x, groups, grouping)
        return add_low_rank(y, x, terms(name), groups, grouping)
    glu = base.glu if quantized else expert_glu(base)
    return experts_forward(hidden_states, top_k_index, top_k_weights, base.num_experts,
                           project, glu)


def _fused_project(base: nn.Module, name: str, x: torch.Tensor, groups,
                   grouping: str) -> torch.Tensor:
    """Sorted rows through fused parameter `name`, plus its per-expert bias (GPT-OSS's)."""
    return add_expert_bias(base, name, grouped_linear(x, out_in(base, name), groups, grouping),
                           groups)


def moe_router(moe: nn.Module) -> nn.Module | None:
    """The router module beside an MoE layer's experts: `gate` (Qwen3-MoE, Mixtral, OLMoE,
    DeepSeek) or `router` (GPT-OSS's GptOssTopKRouter), each returning transformers 5's
    (logits, weights, experts); None when the layer has neither."""
    for leaf in ROUTER_NAMES:
        module = getattr(moe, leaf, None)
        if isinstance(module, nn.Module):
            return module
    return None


class _Unowned:
    """A module held by reference, outside the holder's parameters, state_dict and deep
    copies (a served block refers to the base's MoE layer, never copies it)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __deepcopy__(self, memo):
        return self


class ServedExperts(nn.Module):
    """One adapter's expert LoRA as the server runs it for the rows that use it: a block on
    an MoE layer's input (registry.RowBlock, reads "input") whose output is what the adapter
    adds to that layer's output, the experts with the per-expert terms minus the experts
    without, on the layer's own routing of those rows (its router: moe_router)."""

    def __init__(self, moe: nn.Module, lora: ExpertLora):
        super().__init__()
        self.lora, self.moe = lora, _Unowned(moe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        moe = self.moe.module
        flat = x.reshape(-1, x.shape[-1])
        _, weights, index = moe_router(moe)(flat)  # (logits, weights, experts)
        base = moe.experts(flat, index, weights)
        adapted = run_experts(moe.experts, lambda name: [self.lora.low_rank(name)], flat, index,
                              weights)
        return (adapted - base).view(x.shape)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return self.lora.file_tensors()


def experts_adapter(adapter: PeftFolder, path: str, parts: dict) -> ExpertLora:
    """The method's own experts adapter at `path` (its `delta`, `factors`, `scaling`), holding
    the file's tensors (`parts`, by ExpertLora's kinds)."""
    record = method_record(adapter.config.method)
    if record.make_experts is None:
        raise AdapterError(f"{adapter.folder}: {adapter.config.method} holds tensors of the "
                           f"fused experts {path}, which it cannot adapt")
    r, shapes = adapter.rank(path), {}
    for param, lead in zip(EXPERT_PARAMS, ("base_layer.", "")):
        a, b = parts.get(lead + "lora_A.weight"), parts.get(lead + "lora_B.weight")
        if a is None or b is None:
            raise AdapterError(f"{adapter.weights_path}: {path} lacks the lora_A/lora_B pair "
                               f"of {param} (keys under {path}.{lead or ''})")
        shapes[param] = torch.empty(a.shape[0] // r, b.shape[0], a.shape[1], device="meta")
    ad = record.make_experts(adapter.config, path, SimpleNamespace(**shapes), r=r,
                             alpha=adapter.alpha(path))
    adapter.copy_module(path, parts, ad.file_tensors())
    return ad


def expert_row_blocks(adapter: PeftFolder, model: nn.Module) -> dict[str, RowBlock]:
    """ServingSpec.experts: per MoE layer whose fused experts the file adapts, the block that
    serves them (ServedExperts, float32) on that layer (the experts module's parent)."""
    blocks = {}
    for path, parts in adapter.expert_modules().items():
        layer_path = path.rpartition(".")[0]
        moe = _served_moe(model, path, adapter)
        expected = expert_shapes(moe.experts)
        _check_expert_rank(adapter, path, parts, expected["down_proj"][0])
        lora = experts_adapter(adapter, path, parts).float().requires_grad_(False)
        got = {n: (lora.num_experts, lora.factors(n)[1].shape[1], lora.factors(n)[0].shape[2])
               for n in EXPERT_PARAMS}
        if got != expected:
            raise AdapterError(f"{adapter.weights_path}: the experts at {path} are "
                               f"{expected}, the file's pairs fit {got} (another base model?)")
        blocks[layer_path] = RowBlock(ServedExperts(moe, lora), reads="input")
    return blocks


def _check_expert_rank(adapter: PeftFolder, path: str, parts: dict, experts: int) -> None:
    """lora_A [E·r, in] cannot tell E from r: a file whose rows are this model's E times
    another rank than the config's r has a wrong r or another base's expert count, and the
    error says both (read as rows/r experts, it would blame the base alone)."""
    r = adapter.rank(path)
    # E·r of each tensor: lora_A's rows, lora_B's columns; all four agree in a whole file
    sizes = {t.shape[0 if "lora_A" in kind else -1] for kind, t in parts.items()
             if kind.endswith(("lora_A.weight", "lora_B.weight"))}
    rows = sizes.pop() if len(sizes) == 1 else None
    if rows is None or rows == experts * r or rows % experts:
        return  # fits, or torn/another base: experts_adapter's and the shape check name it
    source = adapter.rank_source(path)
    raise AdapterError(
        f"{adapter.folder / CONFIG_NAME}: {source} is {r}, so {file_key(path, 'lora_A.weight')}"
        f" ({rows} rows, experts × rank) holds {rows // r} experts, and the experts at {path} "
        f"are {experts}: either {source} should be {rows // experts} (this model's {experts} "
        f"experts × rank {rows // experts}) or the file was saved for another base model")


def _served_moe(model: nn.Module, path: str, adapter: PeftFolder) -> nn.Module:
    """The MoE layer above the fused experts at `path`, when its `gate` (GPT-OSS: `router`)
    returns transformers 5's (logits, weights, experts): Qwen3-MoE, Mixtral, OLMoE, GPT-OSS and
    DeepSeek-V2/V3, whose group routing stays inside the gate and whose shared experts are
    plain linears (the slots serve LoRA on them), so the block adds the routed experts'
    difference alone."""
    layer_path = path.rpartition(".")[0]
    try:
        experts, moe = model.get_submodule(path), model.get_submodule(layer_path)
    except AttributeError:
        raise AdapterError(f"{adapter.weights_path}: adapts the fused experts {path}, which "
                           "the served model does not have (another base model?)") from None
    if not is_fused_experts(experts) or moe_router(moe) is None:
        raise AdapterError(f"{adapter.weights_path}: the experts at {path} "
                           f"({type(moe).__name__}) are served for layers routed by a `gate` "
                           "or `router` module beside them (Qwen3-MoE, Mixtral, OLMoE, "
                           "DeepSeek, GPT-OSS) only")
    return moe


# model_types whose adapter files PEFT 0.21 converts as if written under transformers 4: every
# target ending in a gate/up/down projection becomes the fused routed experts' parameters.
_PEFT_V4_CONVERTED = ("qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")
_PROJECTIONS = (".gate_proj", ".up_proj", ".down_proj")


def peft_conversion_note(model: nn.Module, fields: dict) -> str | None:
    """Why PEFT (0.21) would drop this file's LoRA on MLP linears named gate/up/down_proj
    (shared experts, dense layers) of this model type (peft#3711); None when it would not."""
    kind = getattr(getattr(model, "config", None), "model_type", None)
    targets = fields.get("target_modules") or []
    hit = [t for t in targets if isinstance(targets, list) and t.endswith(_PROJECTIONS)]
    if kind not in _PEFT_V4_CONVERTED or not hit:
        return None
    return (f"{hit[0]} ({len(hit)} such targets): PEFT 0.21 reads targets ending in gate_proj/"
            f"up_proj/down_proj of a {kind} model as transformers-4 routed experts and drops "
            "their LoRA (peft#3711, fixed by peft#3715); loratune reads this file as written")


def expert_peft_fields(model: nn.Module, name: str, fields: dict) -> dict:
    """adapter_config.json with PEFT's target_parameters when adapter `name` sits on fused
    experts (PEFT accepts target_modules null beside them); a warning where PEFT would misread
    the file (peft_conversion_note)."""
    note = peft_conversion_note(model, fields)
    if note:
        warnings.warn(f"adapter '{name}': {note}", stacklevel=3)
    if not any(isinstance(h, ExpertHost) and name in h.adapters for h in model.modules()):
        return fields
    return {**fields, "target_parameters": list(EXPERT_TARGETS),
            "target_modules": fields.get("target_modules") or None}


def new_expert_lora(config, path: str, experts: nn.Module, *, r: int, alpha: float,
                    device=None, dtype=None) -> ExpertLora:
    """LoRA's `make_experts`: the per-expert adapter for the fused experts module at `path`."""
    if r < 1:
        raise AdapterError(f"r={r} for {path}: the rank must be greater than 0")
    return ExpertLora(experts, config, r, alpha, device, dtype)
