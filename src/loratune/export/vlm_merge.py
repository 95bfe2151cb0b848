"""`loratune merge` into a vision-language model's checkpoint.

An adapter names modules as the loaded model has them (`model.language_model.layers.0...`);
the family's safetensors store them under older names (Qwen2.5-VL: `model.layers.0...`,
`visual.`; the LLaVAs and mllama: `language_model.model.layers.0...`). transformers renames one
to the other as it loads (its conversion mapping, the one PEFT reads too) and back as it saves.
The same renames, reversed, give the adapter's tensors the checkpoint's names here, so the
streaming merge (export/merge.py) reads and writes the checkpoint as stored, and the merged
folder loads as the base does.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from loratune.adapters.peft_format import PREFIX, canonical_path, pattern_key
from loratune.models.vision import vision_model_type


@dataclasses.dataclass(frozen=True)
class VisionCheckpoint:
    """A VLM folder's tensor names (loaded-model name -> checkpoint name), and the checkpoint
    names of the weights QLoRA stores in 4 bits: the language model's linears
    (models/vlm_quant.py)."""

    names: dict[str, str]
    quantized: frozenset[str]

    def stored_name(self, name: str) -> str:
        """The checkpoint's name for a loaded-model tensor name, or for a module's adapter
        tensor (`<module>.lora_A.weight`: the module renamed as its weight is)."""
        if name in self.names:
            return self.names[name]
        parts = name.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            weight = self.names.get(".".join(parts[:cut]) + ".weight")
            if weight is not None:
                return ".".join([weight.removesuffix(".weight")] + parts[cut:])
        return name

    def stored_path(self, path: str) -> str:
        """The checkpoint's path of a module (its weight's name less `.weight`), or of a
        tensor under a module (stored_name); else `path` unchanged."""
        weight = self.names.get(path + ".weight")
        return weight.removesuffix(".weight") if weight else self.stored_name(path)

    def rename_adapter(self, adapter):
        """The adapter file with each tensor under the checkpoint's module path, and its
        rank_pattern/alpha_pattern (read by module path at merge) renamed alike."""
        tensors = {PREFIX + self.stored_name(k[len(PREFIX):]) if k.startswith(PREFIX) else k: t
                   for k, t in adapter.tensors.items()}
        paths = [canonical_path(p) for p in adapter.modules()]
        raw = dict(adapter.raw)
        for field in ("rank_pattern", "alpha_pattern"):
            if raw.get(field):
                raw[field] = self.rename_pattern(raw[field], paths)
        return dataclasses.replace(adapter, tensors=tensors, raw=raw)

    def rename_pattern(self, pattern: dict, paths: list[str]) -> dict:
        """A PEFT pattern for the checkpoint's names. A key naming a module (or an AdaLoRA
        `<module>.lora_E`) takes the module's stored name; a shorter key or regex that matched
        adapted modules (`paths`, loaded names) under their loaded names but not under their
        stored ones becomes one exact key per such module, where it stood (the first key that
        matches a module wins); any other key is kept."""
        out = {}
        for key, value in pattern.items():
            stored = self.stored_path(key)
            if stored != key:
                out[stored] = value
                continue
            for path in paths:
                if pattern_key(path, pattern) == key and pattern_key(
                        self.stored_path(path), {key: value}) is None:
                    out.setdefault(re.escape(self.stored_path(path)), value)
            out[key] = value
        return out


def vision_checkpoint(base: Path) -> VisionCheckpoint | None:
    """The names of a vision-language folder: its checkpoint's tensors renamed as loading
    renames them, with the model built from its config on the meta device (nothing
    allocated); None for a text model."""
    if vision_model_type(base) is None:
        return None
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, apply_renamings

    from loratune.export.safetensors_io import read_index
    from loratune.models.vlm_quant import language_linears

    config = AutoConfig.from_pretrained(base, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    renames = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    names = {apply_renamings(stored, renames): stored for stored in read_index(base)}
    quantized = frozenset(names[f"{n}.weight"] for n in language_linears(model))
    return VisionCheckpoint(names, quantized)
