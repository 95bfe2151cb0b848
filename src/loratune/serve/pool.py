"""The adapter pool: LoRA folders loaded on first use into a fixed number of slots, LRU-evicted.

An entry is one adapter or a weighted composition ("fin+region_cn"); a composition is exact as
one LoRA of the summed rank: A = [A₁; A₂], B = [w₁s₁B₁, w₂s₂B₂]. Slots used by running requests
are pinned and never evicted. An optional host tier keeps recently evicted adapters' tensors in
CPU memory, so a GPU-served adapter comes back without a disk read.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from loratune.adapters.peft_format import (ANOTHER_BASE, CONFIG_NAME, LORA_KINDS, PeftFolder,
                                           file_key, read_adapter_config, read_peft_weights,
                                           split_key, weights_file)
from loratune.adapters.registry import (NO_EXPERT_COMPOSITION, AdapterError, MethodRecord,
                                        RowBlock, RowLead, method_record)
from loratune.data.new_tokens import new_tokens_of
from loratune.data.templates import adapters_template
from loratune.readers import CorruptFileError
from loratune.serve.multi_lora import MultiLoraLinear, RowSlots, attach, detach, slot_dtype
from loratune.serve.row_blocks import RowBlocks, attach_blocks, detach_blocks
from loratune.serve.types import BadAdapter, ServeError, UnknownAdapter

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass
class HostLora:
    """One adapter as read from disk: per layer path, A [r, in] and scale·B [out, r] (CPU),
    the per-channel scales of methods that have them (RowForm's in_scale, out_scale,
    out_shift by name) and the nonlinear blocks of methods served so (RowBlock). `max_weight`:
    the largest composition weight its B takes within the slots' bound; `why_no_composition`:
    why it cannot be composed at all (None: it can)."""

    name: str
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]
    max_weight: float = math.inf
    scales: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    why_no_composition: str | None = None
    blocks: dict[str, RowBlock] = field(default_factory=dict)
    lead: RowLead | None = None     # prompt learning's virtual tokens (ServingSpec.lead)

    @property
    def nbytes(self) -> int:
        return (sum(a.nbytes + b.nbytes for a, b in self.layers.values())
                + sum(t.nbytes for parts in self.scales.values() for t in parts.values())
                + sum(t.nbytes for b in self.blocks.values()
                      for t in b.module.state_dict().values())
                + sum(t.nbytes for t in (self.lead.tensors() if self.lead else [])))


def entry_key(adapters: dict[str, float]) -> str:
    """A canonical name for an adapter or a weighted composition (order does not matter)."""
    if len(adapters) == 1 and next(iter(adapters.values())) == 1.0:
        return next(iter(adapters))
    return "+".join(f"{n}:{w:g}" for n, w in sorted(adapters.items()))


def value_limit(dtype: torch.dtype) -> float:
    """The largest magnitude a slot value may have in `dtype`: the square root of its range,
    so a product of two such values is still finite (1.8e19 in float32 and bfloat16, 256 in
    float16). A value past it is no trained adapter; it would turn rows into inf and NaN."""
    return math.sqrt(torch.finfo(dtype).max)


def value_problem(t: torch.Tensor, dtype: torch.dtype) -> str | None:
    """Why float32 `t` cannot be a slot tensor of `dtype` (None when it can). Checked in
    float32: a finite value within value_limit(dtype) is finite after the cast too."""
    peak = t.abs().max().item() if t.numel() else 0.0
    if not math.isfinite(peak):
        return f"has values that are not finite ({peak}) in float32"
    if peak > value_limit(dtype):
        return (f"has values up to {peak:.3g}; at most {value_limit(dtype):.3g} keeps products "
                f"finite in {str(dtype).removeprefix('torch.')}, the dtype this layer runs in")
    return None


def check_slot_values(what: str, path: str, a: torch.Tensor, b: torch.Tensor,
                      dtype: torch.dtype) -> None:
    """Refuse A or scale·B of layer `path` that would overflow `dtype` (BadAdapter, 422)."""
    for label, t in (("lora_A", a), ("lora_B × scale", b)):
        problem = value_problem(t, dtype)
        if problem is not None:
            raise BadAdapter(f"{what}: {path} {label} {problem}")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name) or ".." in name:
        raise BadAdapter(f"adapter name {name!r} is not allowed: use letters, digits, '.', '_' "
                         "and '-' (no slashes, no '..'), at most 128 characters")
    return name


def refuse_new_tokens(name: str, folder: Path, model: nn.Module) -> None:
    """An adapter that adds tokens (data.add_tokens) has another vocabulary than the served
    base: its rows cannot share a batch with the others', and its grown embedding replaces the
    whole matrix. Its merged model (which carries its tokenizer) is what serves it."""
    grown = new_tokens_of(folder)
    if grown:
        rows = model.get_input_embeddings().weight.shape[0]
        raise BadAdapter(f"adapter {name!r} ({folder}) adds tokens "
                         f"({', '.join(grown['tokens'])}; vocabulary {grown['vocab_size']}, "
                         f"the served base has {rows} rows): adapters of different "
                         "vocabularies cannot share a batch. Merge it (`loratune merge`, which "
                         "writes its tokenizer too) and serve the merged model")


def read_lora(name: str, folder: Path, model: nn.Module) -> HostLora:
    """Read and check an adapter folder against `model`, as the LoRA factors its method's record
    serves it by (ServingSpec.factors); every error names the file and tensor."""
    try:
        config, raw = read_adapter_config(folder)
        weights_path = weights_file(folder)
        record = method_record(config.method)
    except AdapterError as err:
        raise BadAdapter(f"adapter {name!r}: {err}") from None
    if not record.serving.served:
        instead = ("Merge it into the base with `loratune merge` and serve the merged model "
                   "instead" if record.mergeable else f"It cannot be merged either "
                   f"({record.merge.why_not}): run it with `loratune chat`")
        raise BadAdapter(f"adapter {name!r} ({folder}) is {config.method}: "
                         f"{record.serving.why_not}. {instead}")
    refuse_new_tokens(name, folder, model)
    if getattr(config, "bias", "none") != "none" or raw.get("modules_to_save"):
        raise BadAdapter(f"adapter {name!r} ({folder}) trains biases or whole modules "
                         "(bias / modules_to_save); those cannot be mixed per row. Merge it instead")
    try:
        weights = read_peft_weights(folder, config, raw).tensors
    except CorruptFileError as err:
        raise BadAdapter(f"adapter {name!r}: {err}") from None
    stray = sorted(k for k in weights  # prompt learning's keys are whole names
                   if k not in record.files.keys and split_key(k, record.files.keys) is None)
    if stray:
        raise BadAdapter(f"{weights_path}: tensor {stray[0]} is not a {config.method} tensor "
                         f"(expected names ending in {', '.join(record.files.keys)})")
    experts = list(PeftFolder(folder, config, raw, weights).expert_modules())
    if experts and record.serving.experts is None:
        raise BadAdapter(f"adapter {name!r} ({folder}) adapts the fused experts {experts[0]}: "
                         f"{record.serving.why_no_experts}. Merge it into the base with "
                         "`loratune merge` and serve the merged model instead")
    if record.serving.lead is not None:
        return read_lead(name, record, PeftFolder(folder, config, raw, weights), model)
    try:
        factors, scales, blocks = served_forms(record, PeftFolder(folder, config, raw, weights),
                                               model)
        if experts:  # the fused experts' blocks beside the file's linear layers
            blocks = {**blocks, **record.serving.experts(PeftFolder(folder, config, raw,
                                                                    weights), model)}
    except AdapterError as err:
        raise BadAdapter(str(err)) from None
    layers = {path: fitted(path, a, b, model, weights_path) for path, (a, b) in factors.items()}
    what = f"adapter {name!r} ({weights_path})"
    for path, (a, b) in layers.items():
        check_slot_values(what, path, a, b, slot_dtype(model.get_submodule(path)))
    for path, parts in scales.items():
        check_scales(what, path, parts, model)
    for path, block in blocks.items():
        check_block(what, path, block)
    if not layers and not scales and not blocks:
        raise BadAdapter(f"{weights_path}: no {config.method} tensors")
    why = None if record.serving.factors else record.serving.why_no_composition
    why = NO_EXPERT_COMPOSITION if experts else why
    return HostLora(name, layers, max_weight(layers, model), scales, why, blocks)


def served_forms(record: MethodRecord, adapter: PeftFolder, model: nn.Module
                 ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, dict],
                            dict[str, RowBlock]]:
    """The adapter as its record serves it: per layer LoRA factors, per-channel scales and
    nonlinear blocks."""
    serving = record.serving
    if serving.factors is not None:
        return serving.factors(adapter), {}, {}
    if serving.blocks is not None:
        return {}, {}, serving.blocks(adapter, model)
    forms = serving.rows(adapter, model)
    factors = {p: (f.a, f.b) for p, f in forms.items() if f.a is not None}
    return factors, {p: f.scales() for p, f in forms.items() if f.scales()}, {}


def check_block(what: str, path: str, block: RowBlock) -> None:
    """Refuse a block whose tensors are not finite or past float32's bound (BadAdapter, 422),
    named as the file names them where the block says (file_tensors); the method's own file
    has checked their shapes against the model."""
    module = block.module
    named = module.file_tensors() if hasattr(module, "file_tensors") else module.state_dict()
    for name, t in named.items():
        problem = value_problem(t.float(), torch.float32)
        if problem is not None:
            raise BadAdapter(f"{what}: {path} {name} {problem}")


def check_scales(what: str, path: str, parts: dict[str, torch.Tensor], model: nn.Module) -> None:
    """Refuse per-channel scales that do not fit the layer at `path` or would overflow its
    dtype (BadAdapter, 422)."""
    try:
        layer = model.get_submodule(path)
    except AttributeError:
        raise BadAdapter(f"{what}: {path} has no place in this model ({ANOTHER_BASE})") from None
    for kind, t in parts.items():
        want = layer.in_features if kind == "in_scale" else layer.out_features
        if t.shape != (want,):
            raise BadAdapter(f"{what}: {path} {kind} has shape {tuple(t.shape)}; this model's "
                             f"layer needs ({want},) ({ANOTHER_BASE})")
        problem = value_problem(t, slot_dtype(layer))
        if problem is not None:
            raise BadAdapter(f"{what}: {path} {kind} {problem}")


def fitted(path: str, a: torch.Tensor, b: torch.Tensor, model: nn.Module, weights_path: Path
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, scale·B) of the layer at `path`, refused unless they fit that layer of `model`."""
    key = file_key(path, LORA_KINDS[0])
    try:
        layer = model.get_submodule(path)
    except AttributeError:
        raise BadAdapter(f"{weights_path}: tensor {key} has no place in this model "
                         f"({ANOTHER_BASE})") from None
    shape_in = getattr(layer, "in_features", None)
    shape_out = getattr(layer, "out_features", None)
    if shape_in is None or shape_out is None:  # e.g. an MoE router holding a bare weight
        raise BadAdapter(f"{weights_path}: tensor {key} adapts {path}, a {type(layer).__name__}, "
                         "which is not a linear layer here: LoRA cannot be served on it "
                         "(another base model, or transformers 4's layout of it?)")
    r = a.shape[0]
    if a.shape != (r, shape_in) or b.shape != (shape_out, r):
        raise BadAdapter(f"{weights_path}: {path} has A {tuple(a.shape)} and B "
                         f"{tuple(b.shape)}; this model's layer needs A ({r}, {shape_in}) and "
                         f"B ({shape_out}, {r}) ({ANOTHER_BASE})")
    return a, b


def max_weight(layers: dict[str, tuple[torch.Tensor, torch.Tensor]], model: nn.Module) -> float:
    """The largest |weight| a composition may give these layers: every scale·B times it
    stays within its layer's value_limit."""
    ratios = [value_limit(slot_dtype(model.get_submodule(path))) / peak
              for path, (_, b) in layers.items() if (peak := b.abs().max().item()) > 0]
    return min(ratios, default=math.inf)


def compose(parts: list[tuple[HostLora, float]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the stacked ranks of all parts (weight folded into B); the LoRA family only."""
    if len(parts) > 1 or parts[0][1] != 1.0:
        check_composable({lora.name: lora.why_no_composition for lora, _ in parts})
    out: dict[str, tuple[list, list]] = {}
    for lora, weight in parts:
        for path, (a, b) in lora.layers.items():
            a_list, b_list = out.setdefault(path, ([], []))
            a_list.append(a)
            b_list.append(b * weight)
    return {p: (torch.cat(a, 0), torch.cat(b, 1)) for p, (a, b) in out.items()}


def check_composable(reasons: dict[str, str | None]) -> None:
    """Refuse a composition (or a weight other than 1) of an adapter that cannot take one."""
    for name, why in reasons.items():
        if why is not None:
            raise ServeError(f"model: adapter {name!r} cannot be composed or weighted: {why}; "
                             "serve it alone", param="model")


def read_lead(name: str, record: MethodRecord, adapter: PeftFolder, model: nn.Module
              ) -> HostLora:
    """A prompt-learning adapter as its record serves it (ServingSpec.lead): virtual tokens
    before each row's prompt, bounded like slot values in the dtype they are used in."""
    try:
        lead = record.serving.lead(adapter, model)
    except AdapterError as err:
        raise BadAdapter(str(err)) from None
    dtype = model.get_input_embeddings().weight.dtype
    for t in lead.tensors():
        problem = value_problem(t, dtype)
        if problem is not None:
            raise BadAdapter(f"adapter {name!r} ({adapter.weights_path}): prompt_embeddings "
                             f"{problem}")
    return HostLora(name, {}, why_no_composition=record.serving.why_no_composition, lead=lead)


class AdapterPool:
    """Known adapters (folders under `adapter_dir`, or registered), `max_adapters` of them live."""

    def __init__(self, adapter_dir: str | Path | None = None, max_adapters: int = 8,
                 host_adapters: int = 0, lora_backend: str = "torch"):
        if max_adapters < 1:
            raise ValueError(f"max_adapters must be at least 1, got {max_adapters}")
        self.adapter_dir = Path(adapter_dir).resolve() if adapter_dir else None
        if self.adapter_dir is not None and not self.adapter_dir.is_dir():
            raise FileNotFoundError(f"adapter directory {adapter_dir} does not exist")
        self.max_adapters = max_adapters
        self.host_adapters = host_adapters
        self.lora_backend = lora_backend   # adapters/lora_product.py: what runs the products
        self.lock = threading.RLock()
        self.registered: dict[str, Path] = {}
        self.live: OrderedDict[str, int] = OrderedDict()   # entry key -> slot, LRU first
        self.members: dict[str, set[str]] = {}              # entry key -> adapter names in it
        self.pins: dict[int, int] = {}
        self.free = list(range(1, max_adapters + 1))
        self.host: OrderedDict[str, HostLora] = OrderedDict()
        # Reads made by check() before a first use; that use takes them instead of reading again.
        self.checked: dict[str, HostLora] = {}
        self.max_weights: dict[str, float] = {}   # adapter -> HostLora.max_weight, once read
        self.no_composition: dict[str, str] = {}  # adapter -> why it cannot compose, once read
        self.lead_tokens: dict[str, int] = {}     # adapter -> its virtual tokens, once read
        self.leads: dict[int, RowLead] = {}       # slot -> its virtual tokens (on the device)
        self.counts = {"hits": 0, "misses": 0, "evictions": 0, "loads": 0, "load_seconds": 0.0,
                       "host_hits": 0}
        self.model: nn.Module | None = None
        self.slots = RowSlots(max_adapters + 1)
        self.layers: dict[str, MultiLoraLinear] = {}
        self.row_blocks: dict[str, RowBlocks] = {}

    def bind(self, model: nn.Module) -> RowSlots:
        """Serve `model`: its linear layers get slot-stacked LoRA as adapters need them."""
        detach_blocks(model)
        detach(model)
        self.model = model
        self.row_blocks = {}
        return self.slots

    # -- what is known ------------------------------------------------------------------------
    def names(self) -> list[str]:
        with self.lock:
            found = set(self.registered)
            if self.adapter_dir is not None:
                found |= {p.name for p in self.adapter_dir.iterdir()
                          if (p / CONFIG_NAME).is_file() and NAME.fullmatch(p.name)}
            return sorted(found)

    def folder(self, name: str) -> Path:
        check_name(name)
        with self.lock:
            if name in self.registered:
                return self.registered[name]
        if self.adapter_dir is not None and (self.adapter_dir / name / CONFIG_NAME).is_file():
            return self.adapter_dir / name
        raise UnknownAdapter(name, self.names())

    def chat_template(self, names) -> str | None:
        """The chat template the adapters `names` were trained with (their folders'
        chat_template.jinja, read at each use so an adapter loaded later brings its own);
        None: the tokenizer's own. Adapters of different templates: a DataError naming two."""
        stored = adapters_template(self.folder(name) for name in names)
        return None if stored is None else stored[0]

    def register(self, name: str, path: str | Path) -> None:
        """Make `path` known as `name`; with an adapter directory, only folders inside it."""
        check_name(name)
        folder = Path(path).resolve()
        if self.adapter_dir is not None and not folder.is_relative_to(self.adapter_dir):
            raise BadAdapter(f"adapter folder {path} is outside the adapter directory "
                             f"{self.adapter_dir}; only folders under it can be loaded")
        if not (folder / CONFIG_NAME).is_file():
            raise BadAdapter(f"adapter folder {path} has no {CONFIG_NAME}")
        with self.lock:
            self.registered[name] = folder
            self._drop_entries_with(name)   # a new folder under an old name: reload on next use

    def forget(self, name: str) -> None:
        """Drop a registered name (and its memory); folders under adapter_dir stay known."""
        with self.lock:
            self.registered.pop(name, None)
            self._drop_entries_with(name)
            self.host.pop(name, None)

    def unload(self, name: str) -> None:
        """Free the memory of `name` (and compositions using it); it stays known."""
        folder_known = name in self.names()
        with self.lock:
            dropped = self._drop_entries_with(name)
            dropped |= self.host.pop(name, None) is not None
        if not folder_known and not dropped:
            raise UnknownAdapter(name, self.names())

    def loaded(self) -> list[str]:
        with self.lock:
            return list(self.live)

    def stats(self) -> dict:
        with self.lock:
            return {**self.counts, "live": len(self.live), "capacity": self.max_adapters}

    # -- used by the engine thread -------------------------------------------------------------
    def acquire(self, adapters: dict[str, float]) -> int | None:
        """The slot serving `adapters` (0: base alone), pinned; None when every slot is pinned."""
        if not adapters:
            return 0
        key = entry_key(adapters)
        with self.lock:
            if key in self.live:
                self.counts["hits"] += 1
                self.live.move_to_end(key)
                return self._pin(self.live[key])
            if not self.free and not self._evict_one():
                return None
            self.counts["misses"] += 1
        t0 = time.perf_counter()
        parts = [(self._host_lora(n), w) for n, w in adapters.items()]
        layers = compose(parts)
        for path, (a, b) in layers.items():     # the weights times B, in the slots' dtype
            check_slot_values(f"model {key!r}", path, a, b,
                              slot_dtype(self.model.get_submodule(path)))
        # A composition is LoRA factors only (compose refused any other).
        scales, blocks = (parts[0][0].scales, parts[0][0].blocks) if len(parts) == 1 else ({}, {})
        with self.lock:
            slot = self.free.pop()
            self._fill(slot, layers, scales, blocks)
            self._fill_lead(slot, parts[0][0].lead if len(parts) == 1 else None)
            self.live[key] = slot
            self.members[key] = set(adapters)
            self.counts["loads"] += 1
            self.counts["load_seconds"] += time.perf_counter() - t0
            return self._pin(slot)

    def check_weights(self, adapters: dict[str, float]) -> None:
        """Refuse a composition weight that would take an adapter's values past the slots'
        bound (a 400 before the request runs), or any composition of an adapter whose method
        does not compose, for adapters read already; acquire checks the composed tensors."""
        if len(adapters) > 1 or any(w != 1.0 for w in adapters.values()):
            with self.lock:
                check_composable({n: self.no_composition.get(n) for n in adapters})
        for name, weight in adapters.items():
            with self.lock:
                limit = self.max_weights.get(name, math.inf)
            if abs(weight) > limit:
                raise ServeError(f"model: weight {weight:g} for adapter {name!r} is too large: "
                                 f"its lora_B × scale times the weight must stay within the "
                                 f"range where products are finite in the model's dtype, which "
                                 f"allows weights up to {limit:.3g}", param="model")

    def drop_entry(self, key: str) -> None:
        """Forget the slot of entry `key` (an adapter or composition whose rows went
        non-finite): it is zeroed once no running row holds it, and read again on next use."""
        with self.lock:
            slot = self.live.pop(key, None)
            self.members.pop(key, None)
            if slot is not None and slot not in self.pins:
                self._clear(slot)

    def release(self, slot: int) -> None:
        if slot == 0:
            return
        with self.lock:
            self.pins[slot] -= 1
            if not self.pins[slot]:
                del self.pins[slot]
                if slot not in self.live.values() and slot not in self.free:
                    self._clear(slot)      # dropped while in use: free it now

    # -- internals -----------------------------------------------------------------------------
    def _pin(self, slot: int) -> int:
        self.pins[slot] = self.pins.get(slot, 0) + 1
        return slot

    def check(self, name: str) -> None:
        """Read and check adapter `name` now (errors raise here, off the engine thread); its
        first use then takes this read instead of reading the folder again."""
        if self.model is None:
            raise RuntimeError("AdapterPool.bind(model) must be called before adapters are used")
        lora = read_lora(name, self.folder(name), self.model)
        with self.lock:
            self.checked[name] = lora
            self._remember(lora)

    def _host_lora(self, name: str) -> HostLora:
        with self.lock:
            if name in self.host:
                self.host.move_to_end(name)
                self.counts["host_hits"] += 1
                return self.host[name]
            lora = self.checked.pop(name, None)
        if self.model is None:
            raise RuntimeError("AdapterPool.bind(model) must be called before adapters are used")
        if lora is None:
            lora = read_lora(name, self.folder(name), self.model)
            with self.lock:
                self._remember(lora)
        if self.host_adapters:
            with self.lock:
                self.host[name] = lora
                while len(self.host) > self.host_adapters:
                    self.host.popitem(last=False)
        return lora

    def _remember(self, lora: HostLora) -> None:
        self.max_weights[lora.name] = lora.max_weight
        self.lead_tokens[lora.name] = lora.lead.tokens if lora.lead else 0
        if lora.why_no_composition is None:
            self.no_composition.pop(lora.name, None)
        else:
            self.no_composition[lora.name] = lora.why_no_composition

    def _fill(self, slot: int, layers: dict[str, tuple[torch.Tensor, torch.Tensor]],
              scales: dict[str, dict[str, torch.Tensor]], blocks: dict[str, RowBlock]) -> None:
        self.layers = attach(self.model, [*layers, *scales], self.slots, self.max_adapters + 1,
                             self.lora_backend)
        for path, (a, b) in layers.items():
            self.layers[path].fill(slot, a, b)
        for path, parts in scales.items():
            self.layers[path].fill_scales(slot, **parts)
        self.row_blocks.update(attach_blocks(self.model, list(blocks), self.slots))
        for path, block in blocks.items():
            self.row_blocks[path].fill(slot, block)

    def _fill_lead(self, slot: int, lead: RowLead | None) -> None:
        """Keep `slot`'s virtual tokens where and as the model runs them (pool lock held)."""
        if lead is not None:
            weight = self.model.get_input_embeddings().weight
            self.leads[slot] = lead.to(weight.device, weight.dtype)

    def lead(self, slot: int) -> RowLead | None:
        """The virtual tokens before the prompt of rows on `slot` (None: none)."""
        with self.lock:
            return self.leads.get(slot)

    def _clear(self, slot: int) -> None:
        self.leads.pop(slot, None)
        for layer in [*self.layers.values(), *self.row_blocks.values()]:
            layer.clear(slot)
        self.free.append(slot)

    def _evict_one(self) -> bool:
        for key, slot in self.live.items():
            if slot not in self.pins:
                del self.live[key]
                self.members.pop(key, None)
                self._clear(slot)
                self.counts["evictions"] += 1
                return True
        return False

    def _drop_entries_with(self, name: str) -> bool:
        self.checked.pop(name, None)  # read from a folder that may no longer be the name's
        self.max_weights.pop(name, None)
        self.lead_tokens.pop(name, None)
        self.no_composition.pop(name, None)
        keys = [k for k, names in self.members.items() if name in names]
        for key in keys:
            slot = self.live.pop(key)
            del self.members[key]
            if slot not in self.pins:
                self._clear(slot)
        return bool(keys)
