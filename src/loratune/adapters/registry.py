"""The method registry: what `adapter.method` means, declared at the end of each method's file.

A method module ends with `register(MethodRecord(...))`. `loratune.adapters` imports every
built-in method module, so importing any part of the package registers them; a method defined
elsewhere (a plugin, a test) registers itself the same way. This module imports no method module
(the records point at them), which is what keeps the package free of import cycles.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from loratune.config import AdapterConfig, add_adapter_options, forget_adapter_options


class AdapterError(ValueError):
    pass


class TrainingHooks:
    """What a method adds to the training step; this base adds nothing.

    MoE-LoRA returns its routers' balance loss from `micro_loss`; AdaLoRA adds its orthogonality
    loss in `step_loss` and reallocates its rank budget in `after_step`.
    """

    def before_training(self, batches: Iterator[dict]) -> None:
        """Called once before the optimizer is built, with the run's training micro-batches in
        order (endless): an init fitted to the data (EVA) may reshape the adapter here."""

    def micro_loss(self) -> torch.Tensor | None:
        """Loss terms the last forward left behind, added to each micro-batch before backward."""
        return None

    def step_loss(self) -> torch.Tensor | None:
        """Per-step terms that do not depend on the batch, backpropagated once per step."""
        return None

    def after_step(self, step: int) -> None:
        """Called after optimizer.step(), before zero_grad (the gradients are still there)."""

    def summary(self) -> dict:
        """Extra entries for run_summary.json."""
        return {}

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors a checkpoint holds so that a resumed run continues the hooks exactly."""
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor], where: Path) -> None:
        """Restore `state()` as read from checkpoint file `where`."""


@dataclass(frozen=True)
class FileSpec:
    """How the method's adapter folders are written and read (adapters/io.py, peft_format.py)."""

    # Endings of the tensor names this method writes (`<prefix><path>.<ending>`, or the whole key
    # for prompt learning): they split file keys into module path + kind and tell, in a mixed-up
    # folder, which method a stray tensor came from.
    keys: tuple[str, ...]
    # (model, name, config, compact) -> the method's own adapter_config.json fields
    peft_fields: Callable[[nn.Module, str, AdapterConfig, bool], dict] | None = None
    # options read from a file -> the options to build the config from
    loaded_options: Callable[[dict], dict] | None = None
    # (model, name, raw config dict, file tensors): fit the fresh adapter to the file first
    before_load: Callable[[nn.Module, str, dict, dict], None] | None = None


@dataclass(frozen=True)
class TrainingSpec:
    """What training (train/) and the planner need to know beyond the layers themselves."""

    # (model, config, name, total_steps) -> TrainingHooks
    hooks: Callable[[nn.Module, AdapterConfig, str, int], TrainingHooks] | None = None
    why_no_packing: str | None = None         # None: rows may be packed
    why_single_process: str | None = None     # None: DDP/FSDP can train it
    # DDP must expect parameters without a gradient in some steps (MoE-LoRA's unrouted experts).
    unused_parameters: bool = False
    # (config) -> the virtual tokens put before every row: they take context positions, so they
    # and the longest row must fit the model
    virtual_tokens: Callable[[AdapterConfig], int] | None = None
    # (config) -> why a run with these options cannot resume from its checkpoints; None: it can
    why_no_resume: Callable[[AdapterConfig], str | None] | None = None
    # What `loratune plan` leaves out when it counts this method as LoRA of the same total
    # rank; None: the LoRA estimate is this method's own.
    plan_note: str | None = "estimated as LoRA of the same total rank"
    # (config) -> the LoRA rank `loratune plan` counts the method as; None: the config's r
    plan_rank: Callable[[AdapterConfig], int] | None = None


@dataclass(frozen=True)
class MergeSpec:
    """Merging folds each layer's `merge_into` (adapters/host.py) into the base weights."""

    why_not: str | None = None                # None: merge folds it into the weights


# What a consumer says when a method declares no per-row serving or GGUF-adapter path.
NO_SERVING = "the server runs LoRA-product adapters side by side, and this one is not one"
NO_GGUF = "llama.cpp's adapter GGUF holds plain LoRA factors only"
# ... and what it says of an adapter on fused experts (adapters/expert_lora.py) it cannot run.
NO_EXPERT_SERVING = ("the server's slots hold one A/B pair per linear layer, and fused experts "
                     "take a pair per expert inside the experts' own loop")


NO_COMPOSITION = ("a composition adds LoRA factors (A stacked, weight·B side by side), which "
                  "is exact only for the LoRA family")
NO_EXPERT_COMPOSITION = ("its fused experts run as one block per MoE layer (the experts with "
                         "the adapter minus without), and blocks do not add up")


@dataclass
class RowForm:
    """One layer of an adapter as the server applies it to the rows that use it:

        y = out_scale ⊙ (base(in_scale ⊙ x) + (in_scale ⊙ x)·Aᵀ·(s·B)ᵀ) + out_shift

    float32 tensors; a part left None is the identity (no factors, scales of 1, shift of 0).
    LoRA sets a and b; DoRA also out_scale = m/‖W + s·B·A‖ and out_shift = bias·(1 − out_scale);
    IA³ one of in_scale, out_scale."""

    a: torch.Tensor | None = None           # [r, in]
    b: torch.Tensor | None = None           # [out, r], the scale folded in
    in_scale: torch.Tensor | None = None    # [in]
    out_scale: torch.Tensor | None = None   # [out]
    out_shift: torch.Tensor | None = None   # [out]

    def scales(self) -> dict[str, torch.Tensor]:
        """The per-channel parts that are set, by name."""
        return {k: t for k in ("in_scale", "out_scale", "out_shift")
                if (t := getattr(self, k)) is not None}


@dataclass
class RowBlock:
    """A nonlinear piece of an adapter at one module path, as the server runs it for the rows
    that use it (serve/row_blocks.py): `module(t)` is the delta added to that module's output,
    where t is the module's input (`reads="input"`: its first argument or `hidden_states=`) or
    its output (`"output"`: the first element of a tuple). Float32 parameters; the module takes
    t in the model's dtype and casts it itself. Bottleneck blocks read a sublayer's output,
    MoE-LoRA's routed experts a linear layer's input."""

    module: nn.Module
    reads: str = "output"


@dataclass
class RowLead:
    """What a prompt-learning adapter puts before each row's prompt, as the server runs it:
    `embeds` [n, hidden], virtual token embeddings that go through the model in front of the
    prompt (prompt tuning), or `key_values`, per layer (keys, values) [kv_heads, n, head_dim]
    that the row's attention sees in its KV cache before the prompt (prefix tuning). Either
    way the row's positions start after the n virtual tokens, as in the method's own
    generate(). Float32 as read; the pool casts it to the model's device and dtype."""

    embeds: torch.Tensor | None = None
    key_values: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def tokens(self) -> int:
        """The virtual tokens: columns of the row's KV cache before its prompt."""
        return (self.embeds if self.embeds is not None else self.key_values[0][0]).shape[-2]

    def tensors(self) -> list[torch.Tensor]:
        return [self.embeds] if self.embeds is not None else [t for kv in self.key_values
                                                              for t in kv]

    def to(self, device: torch.device, dtype: torch.dtype) -> RowLead:
        if self.embeds is not None:
            return RowLead(embeds=self.embeds.to(device, dtype))
        return RowLead(key_values=[(k.to(device, dtype), v.to(device, dtype))
                                   for k, v in self.key_values])


@dataclass(frozen=True)
class ServingSpec:
    """How the server runs the method for some rows of a mixed batch (serve/pool.py), or why not.

    `factors`: (PeftFolder) -> {module path: (A [r, in], scale·B [out, r])} in float32, the
    LoRA product (adapters/lora_product.py) that the pool stacks into its slots; such methods
    also compose (`a:0.5+b:0.5`).
    `rows`: (PeftFolder, model) -> {module path: RowForm}, for methods that need per-channel
    scales too (computed once at load, against the served base's weights); they do not compose,
    for `why_no_composition`.
    `blocks`: (PeftFolder, model) -> {module path: RowBlock}, for methods nonlinear in x (no
    product or scale equals them); they do not compose either.
    `lead`: (PeftFolder, model) -> RowLead, for prompt-learning methods (virtual tokens before
    each row's prompt, in its KV cache); they do not compose either.
    `experts`: (PeftFolder, model) -> {MoE layer path: RowBlock}, the file's adapters on fused
    experts beside its other forms (else refused for `why_no_experts`); they do not compose."""

    factors: Callable | None = None
    rows: Callable | None = None
    blocks: Callable | None = None
    lead: Callable | None = None
    experts: Callable | None = None
    why_not: str = NO_SERVING
    why_no_composition: str = NO_COMPOSITION
    why_no_experts: str = NO_EXPERT_SERVING   # an adapter on fused experts

    @property
    def served(self) -> bool:
        return any(f is not None for f in (self.factors, self.rows, self.blocks, self.lead))


@dataclass(frozen=True)
class ExportSpec:
    """What `export gguf --lora` can write as llama.cpp's adapter file; otherwise merge first.

    `gguf_factors`: as ServingSpec.factors, the pairs llama.cpp multiplies as x·Aᵀ·Bᵀ. An
    adapter on fused experts is written through the method's `make_experts` adapter (its
    per-expert `factors`) as llama.cpp's 3-D pairs (export/gguf_file.py)."""

    gguf_factors: Callable | None = None
    why_not: str = NO_GGUF


@dataclass(frozen=True)
class MethodRecord:
    """Every fact about one method that code outside its own file needs, grouped by who asks.

    Exactly one of `make_layer` (layer-level: an adapter per targeted linear, hosted by
    `AdaptedLinear`) and `attach` (model-level: the method places its own host) is set.
    """

    name: str                        # adapter.method
    config_class: type[AdapterConfig]
    peft_type: str                   # adapter_config.json's peft_type
    files: FileSpec
    # (config, module path, in_features, out_features, *, r, alpha, device, dtype) -> LayerAdapter;
    # r and alpha are the module's rank and alpha (None: the config's) for methods with has_rank.
    make_layer: Callable[..., nn.Module] | None = None
    # (model, config, name, tokenizer) -> None: put adapter `name` in the method's own host(s).
    attach: Callable[..., None] | None = None
    # (model, config, name) -> None, layer-level only: runs once adapter `name` sits on every
    # targeted layer, for state its layers share (VeRA's projections, sized by the largest layer)
    after_layers: Callable[[nn.Module, AdapterConfig, str], None] | None = None
    # (config, target module paths): refuse options that do not fit the targets (layer-level)
    check_targets: Callable[[AdapterConfig, list[str]], None] | None = None
    has_rank: bool = False           # an `r` option, with PEFT's rank/alpha patterns per module
    # Can adapt only some output rows of a layer (`restrict_outputs`): the parts of a fused layer
    # a target_modules list names (IA³ scales only Phi-3's k/v rows of qkv_proj). Without it,
    # naming such a part is refused.
    slices_outputs: bool = False
    # (config, path, experts module, *, r, alpha, device, dtype) -> the adapter on routed experts
    # held as fused 3-D parameters ('experts' in target_modules; adapters/expert_lora.py).
    # None: the method cannot adapt them, and naming 'experts' is refused.
    make_experts: Callable[..., nn.Module] | None = None
    training: TrainingSpec = TrainingSpec()
    merge: MergeSpec = MergeSpec()
    serving: ServingSpec = ServingSpec()
    export: ExportSpec = ExportSpec()

    def __post_init__(self):
        if (self.make_layer is None) == (self.attach is None):
            raise ValueError(f"method {self.name!r}: give exactly one of make_layer (layer-level) "
                             "and attach (model-level)")
        if self.name not in self.config_class.method_names():
            raise ValueError(f"method {self.name!r}: {self.config_class.__name__}.method does not "
                             f"allow it (allows {', '.join(self.config_class.method_names())})")

    @property
    def layer_level(self) -> bool:
        return self.make_layer is not None

    @property
    def mergeable(self) -> bool:
        return self.merge.why_not is None


_RECORDS: dict[str, MethodRecord] = {}


def register(record: MethodRecord) -> MethodRecord:
    """Make `record.name` a method every loratune command understands."""
    if record.name in _RECORDS and _RECORDS[record.name] != record:
        raise ValueError(f"method {record.name!r} is already registered")
    _RECORDS[record.name] = record
    add_adapter_options(record.config_class)  # again after an unregister
    return record


def unregister(name: str) -> None:
    """Forget method `name` (tests that register a method of their own clean up with this)."""
    record = _RECORDS.pop(name)
    if not any(r.config_class is record.config_class for r in _RECORDS.values()):
        forget_adapter_options(record.config_class)


def method_names() -> list[str]:
    return list(_RECORDS)


def method_record(name: str) -> MethodRecord:
    try:
        return _RECORDS[name]
    except KeyError:
        raise AdapterError(f"unknown method {name!r}; choose from "
                           f"{', '.join(_RECORDS) or 'none'}") from None


def records_of_peft_type(peft_type: str) -> list[MethodRecord]:
    return [r for r in _RECORDS.values() if r.peft_type == peft_type]


def peft_types() -> list[str]:
    return list(dict.fromkeys(r.peft_type for r in _RECORDS.values()))
