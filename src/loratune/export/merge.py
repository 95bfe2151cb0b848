"""Merge adapters into a base checkpoint and write a plain Hugging Face folder, tensor by tensor.

The base is never loaded as a model: each weight is read from its safetensors shard, the
adapters that target it are folded in (the same `merge_into` math the live layers use), and it
is appended to its output shard on disk (plain reads and writes, no memory map). Peak memory is
about one layer, whatever the model's size.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loratune.adapters.inject import new_layer_adapter
from loratune.adapters.peft_format import (ANOTHER_BASE, PeftFolder, module_path,
                                           read_adapter_config, read_peft_weights)
from loratune.adapters.registry import AdapterError, method_record
from loratune.export.merge_experts import ExpertMerge, expert_round_trip, expert_slot
from loratune.export.safetensors_io import StreamWriter, decoded_index, read_index, read_tensor
from loratune.data.new_tokens import copy_tokenizer, new_tokens_of
from loratune.data.templates import TEMPLATE_FILE, adapters_template
from loratune.files import check_output_path, write_atomic_dir
from loratune.models.device import DTYPES
from loratune.models.mxfp4 import is_mxfp4

WEIGHT_FILES = ("*.safetensors", "model.safetensors.index.json")
PICKLES = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")


@dataclass
class AdapterFile(PeftFolder):
    """An adapter folder to merge, with the weight its update is merged at."""

    weight: float = 1.0


@dataclass
class MergeReport:
    out: Path
    merged_modules: int
    replaced_tensors: int
    shards: int
    seconds: float
    notes: list[str] = field(default_factory=list)


def parse_size(text: str | int) -> int:
    """'2GB' / '500MB' / bytes -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"shard size {text!r}: expected a number with KB/MB/GB, e.g. 2GB")
    unit = (m.group(2) or "B").upper().replace("I", "")
    return int(float(m.group(1)) * {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30}[unit])


def read_adapters(folders: list[str | Path], weights: list[float] | None) -> list[AdapterFile]:
    if weights is not None and len(weights) != len(folders):
        raise AdapterError(f"{len(weights)} weights given for {len(folders)} adapters; give one "
                           "weight per --adapter (e.g. --weights 0.7,0.3)")
    out = []
    for i, folder in enumerate(folders):
        config, raw = read_adapter_config(folder)
        why = method_record(config.method).merge.why_not
        if why is not None:
            raise AdapterError(f"{folder}: a {config.method} adapter cannot be merged: {why}. "
                               "Load it on the base model instead (loratune chat/serve "
                               "--adapter DIR).")
        tensors = read_peft_weights(folder, config, raw).tensors
        out.append(AdapterFile(Path(folder), config, raw, tensors,
                               1.0 if weights is None else float(weights[i])))
    return out


def _build(adapter: AdapterFile, path: str, parts: dict, out_f: int, in_f: int, source: str,
           shapes: dict[str, tuple[int, ...]], base: torch.nn.Linear | None = None):
    """The adapter of the module at `path`, filled with its tensors from the file (`parts`);
    `shapes`: the base's (out, in) of every module the file targets. `base`: the layer, whose
    weight an init that changes the base (a LoftQ file) changes first, as loading does."""
    record = method_record(adapter.config.method)
    r = alpha = None
    if record.has_rank:  # the file's rank, and the module's alpha
        a = parts.get("lora_A.weight")
        r = a.shape[0] if a is not None else None
        alpha = adapter.alpha(path)
    ad = new_layer_adapter(adapter.config, path, in_f, out_f, r=r, alpha=alpha)
    if base is not None:
        ad.init_from_base(base)
    ad.fit_file(path, parts, adapter.raw)
    ad.fit_folder(adapter, shapes)
    live = ad.file_tensors()
    for suffix, tensor in parts.items():
        if suffix not in live or tuple(live[suffix].shape) != tuple(tensor.shape):
            got = tuple(tensor.shape)
            want = tuple(live[suffix].shape) if suffix in live else "no such tensor"
            raise AdapterError(f"{adapter.folder}: {path}.{suffix} has shape {got}, but {source} "
                               f"has {path}.weight of shape ({out_f}, {in_f}) (expects {want}; "
                               f"{ANOTHER_BASE})")
        with torch.no_grad():
            live[suffix].copy_(tensor)
    return ad


def as_linear(w: torch.Tensor) -> torch.nn.Linear:
    """A bias-free linear layer holding `w` (for an adapter's `init_from_base`)."""
    layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    layer.weight = torch.nn.Parameter(w, requires_grad=False)
    return layer


def plan_shards(plan: list[tuple[str, torch.dtype, tuple]], limit: int) -> list[list]:
    """Split the tensor list into consecutive shards of at most `limit` bytes (one tensor
    larger than the limit gets a shard of its own)."""
    shards, current, size = [], [], 0
    for item in plan:
        n = torch.empty((), dtype=item[1]).element_size()
        for d in item[2]:
            n *= d
        if current and size + n > limit:
            shards.append(current)
            current, size = [], 0
        current.append(item)
        size += n
    return shards + ([current] if current else [])


def write_shards(folder: Path, shards: list[list], produce) -> None:
    """Write each shard's tensors as `produce(name)` makes them, plus the index if > 1 file."""
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [
        f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for file, plan in zip(names, shards):
        writer = StreamWriter(folder / file, plan)
        for name, _, _ in plan:
            writer.write(name, produce(name))
            weight_map[name] = file
        writer.close()
    if n > 1:
        total = sum((folder / f).stat().st_size for f in names)
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


def merge_folder(base: Path, adapters: list[AdapterFile], out: Path, dtype: str | None = None,
                 shard_size: str | int = "2GB", overwrite: bool = False,
                 transform=None) -> MergeReport:
    """Stream `base` (a safetensors folder) through the adapters into a new folder at `out`.

    `transform(name, tensor, read)`, if given, rewrites each base weight first (e.g. the NF4
    round trip a QLoRA adapter was trained against); `read(other)` reads another base tensor
    (an expert's gate half is quantized together with its up half).
    """
    t0 = time.perf_counter()
    check_output_path(out, [base] + [a.folder for a in adapters])
    config = json.loads((base / "config.json").read_text())
    index = read_index(base)
    if is_mxfp4(config):  # GPT-OSS's MXFP4 experts are written decoded, as transformers loads them
        index = decoded_index(index, str(base))
        config = {k: v for k, v in config.items() if k != "quantization_config"}
    elif config.get("quantization_config"):
        raise ValueError(f"{base} holds pre-quantized weights "
                         f"({config['quantization_config'].get('quant_method', 'unknown')}); "
                         "merge from the full-precision checkpoint")
    out_dtype = DTYPES[dtype] if dtype else None
    modules = [a.layer_modules() for a in adapters]
    for a, mods in zip(adapters, modules):
        missing = [p for p in mods if f"{p}.weight" not in index]
        if missing:
            raise AdapterError(f"{a.folder}: targets {missing[0]}, which {base} does not have "
                               f"({len(missing)} such modules; {ANOTHER_BASE})")
    shapes = [{p: index[f"{p}.weight"].shape for p in mods} for mods in modules]
    # Tensors a file holds whole (trained biases, modules_to_save) replace the base's.
    replaced = {module_path(k): t for a in adapters for k, t in a.tensors.items()
                if module_path(k) in index}
    merged_paths = _all_paths(modules)
    experts = ExpertMerge(adapters, list(index), str(base),  # adapters on fused experts
                          lambda: quantized_experts(config))
    stats = {"merged": 0}
    grown = grown_vocabulary(adapters, config)  # new tokens: rows, vocab_size and tokenizer
    # refused before the slow part: adapters trained with different chat templates
    stored = adapters_template([a.folder for a in adapters])

    def out_type(entry) -> torch.dtype:
        return out_dtype if out_dtype is not None and entry.dtype.is_floating_point else entry.dtype

    def read(name: str) -> torch.Tensor:
        tensor = replaced[name] if name in replaced else read_tensor(index[name])
        if transform is None:
            return tensor
        return transform(name, tensor, lambda other: read_tensor(index[other]))

    stash: dict[str, torch.Tensor] = {}

    def merge_module(path: str) -> None:
        """Weight and bias of one adapted layer, both rewritten; kept until their turn."""
        w = read(f"{path}.weight").float()
        bias_name = f"{path}.bias"
        b = read(bias_name).float() if bias_name in index else None
        for a, m, s in zip(adapters, modules, shapes):
            if path in m:
                layer = as_linear(w)
                ad = _build(a, path, m[path], w.shape[0], w.shape[1], str(base), s, layer)
                w = layer.weight.detach()
                with torch.no_grad():
                    w, b = ad.merge_into(w, b, a.weight)
        stats["merged"] += 1
        stash[f"{path}.weight"] = w.to(out_type(index[f"{path}.weight"]))
        if b is not None:
            stash[bias_name] = b.to(out_type(index[bias_name]))

    def output(name: str) -> torch.Tensor:
        path = name.rsplit(".", 1)[0]
        if path in merged_paths and name.endswith((".weight", ".bias")):
            if name not in stash:
                merge_module(path)
            return stash.pop(name)
        if experts.owns(name):
            return experts.merge(name, read(name)).to(out_type(index[name]))
        return read(name).to(out_type(index[name]))

    non_finite: list[tuple[str, torch.dtype]] = []

    def produce(name: str) -> torch.Tensor:
        # Checked as written: a sum finite in float32 can still overflow float16.
        tensor = output(name)
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            non_finite.append((name, tensor.dtype))
        return tensor

    plan = [(name, out_type(e), tuple(replaced[name].shape) if name in replaced else e.shape)
            for name, e in index.items()]

    def fill(tmp: Path) -> None:
        shards = plan_shards(plan, parse_size(shard_size))
        write_shards(tmp, shards, produce)
        if non_finite:  # every tensor is made first, so that the error can name them all
            raise _non_finite_error(out, non_finite)
        stats["shards"] = len(shards)
        _copy_side_files(base, tmp, config, dtype)
        if grown is not None:
            copy_tokenizer(grown, tmp)
        if stored is not None:
            write_chat_template(tmp, stored[0])

    write_atomic_dir(out, fill, overwrite=overwrite, marker="config.json")
    return MergeReport(out, stats["merged"] + len(experts.paths), len(replaced), stats["shards"],
                       time.perf_counter() - t0)


def grown_vocabulary(adapters: list[AdapterFile], config: dict) -> Path | None:
    """The adapter folder whose tokenizer the merged model takes when the adapters add tokens
    (data.add_tokens; its grown rows replace the base's as modules_to_save do), `config`'s
    vocab_size raised to match; adapters adding different tokens are refused by name."""
    records = [(a.folder, new_tokens_of(a.folder)) for a in adapters]
    grown = [(folder, r) for folder, r in records if r is not None]
    if not grown:
        return None
    if len(grown) < len(records) or any(r != grown[0][1] for _, r in grown):
        names = ", ".join(f"{folder} ({', '.join(r['tokens']) if r else 'none'})"
                          for folder, r in records)
        raise AdapterError(f"the adapters add different new tokens ({names}); a merged model "
                           "has one vocabulary: merge them one at a time")
    config["vocab_size"] = max(config.get("vocab_size", 0), grown[0][1]["vocab_size"])
    return Path(grown[0][0])


def write_chat_template(folder: Path, text: str) -> None:
    """`text` as the folder's one chat template (the adapters were trained with it): in
    chat_template.jinja, where transformers 5 reads it first and saves it, and taken out of
    tokenizer_config.json, so that no reader (llama.cpp's converter, an older transformers)
    finds the base's there instead."""
    (folder / TEMPLATE_FILE).write_text(text, encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        if data.pop("chat_template", None) is not None:
            config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n",
                              encoding="utf-8")


def side_files_with_template(base: Path, out: Path, text: str) -> Path:
    """`base`'s files other than weights (config, tokenizer, generation config) in a new folder
    `out`, with `text` as its chat template: the tokenizer an adapter's Modelfile describes."""
    out.mkdir()
    _copy_side_files(base, out, json.loads((base / "config.json").read_text()), None)
    write_chat_template(out, text)
    return out


def _non_finite_error(out: Path, bad: list[tuple[str, torch.dtype]]) -> AdapterError:
    names = ", ".join(name for name, _ in bad[:3]) + (f", and {len(bad) - 3} more"
                                                      if len(bad) > 3 else "")
    dtypes = ", ".join(sorted({str(dtype).removeprefix("torch.") for _, dtype in bad}))
    return AdapterError(f"{out}: the merge gives NaN or Inf in {len(bad)} tensors as {dtypes} "
                        f"({names}); nothing was written. Check the adapters' values (or the "
                        "weights given with --weights), or write a wider --dtype")


def _all_paths(modules: list[dict]) -> set[str]:
    return {p for m in modules for p in m}


def _copy_side_files(base: Path, out: Path, config: dict, dtype: str | None) -> None:
    """Config (dtype updated), generation config, tokenizer and chat template; never pickles."""
    skip = {p.name for pattern in WEIGHT_FILES + PICKLES for p in base.glob(pattern)}
    for item in base.iterdir():
        if item.name in skip or item.name == "config.json" or item.name.startswith("."):
            continue
        if item.is_file():
            shutil.copy2(item, out / item.name)
    if dtype:
        config["torch_dtype"] = dtype
        config["dtype"] = dtype
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def base_folder(model: str) -> tuple[Path, Path | None]:
    """(safetensors folder, temp folder to delete afterwards) for a model name or path."""
    from loratune.models.load import convert_gguf_to_folder, resolve_model

    folder, gguf = resolve_model(model)
    if gguf is None:
        return folder, None
    tmp = Path(tempfile.mkdtemp(prefix="loratune-gguf-"))
    convert_gguf_to_folder(folder / gguf, tmp / "model")
    return tmp / "model", tmp


def _meta_model(config: dict):
    """The architecture on the meta device, from the config alone: nothing is allocated."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))


def linear_weight_names(config: dict) -> set[str]:
    """`<path>.weight` of the linears QLoRA quantizes (all but the output layer)."""
    from torch import nn

    from loratune.models.modules import output_layer_names

    model = _meta_model(config)
    skip = output_layer_names(model)
    return {f"{n}.weight" for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n not in skip}


def quantized_experts(config: dict) -> dict[str, bool]:
    """Path -> stored transposed (GPT-OSS) of the fused routed experts QLoRA holds in 4 bits."""
    from loratune.models.moe_experts import is_fused_experts

    return {n: bool(getattr(m, "is_transposed", False))
            for n, m in _meta_model(config).named_modules() if is_fused_experts(m)}


def nf4_round_trip(config: dict, quant, names: set[str] | None = None) -> callable:
    """A `transform` giving each quantized linear, and each routed expert's matrices, the
    values the QLoRA adapter trained against; `names`: the weights QLoRA quantized, when not
    every linear but the output layer (a vision-language model's: its language model's,
    export/vlm_merge.py; its experts are then left as they are)."""
    from loratune.quant.nf4 import dequantize_4bit, quantize_4bit

    experts = quantized_experts(config) if names is None else {}
    names = linear_weight_names(config) if names is None else names

    def rounded(t: torch.Tensor) -> torch.Tensor:
        q = quantize_4bit(t.float(), quant.blocksize, quant.type, quant.double_quant)
        return dequantize_4bit(q, torch.float32)

    def transform(name: str, tensor: torch.Tensor, read) -> torch.Tensor:
        if name in names:
            return rounded(tensor).to(tensor.dtype)
        slot = expert_slot(name)
        if slot is None or slot[0] not in experts:
            return tensor
        return expert_round_trip(name, tensor, read, rounded, experts[slot[0]]).to(tensor.dtype)

    return transform
