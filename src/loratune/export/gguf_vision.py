"""GGUF export of a vision-language model: the two files llama.cpp's mtmd reads.

`<name>.gguf` holds the language model under the family's text architecture (Gemma 3 as
`gemma3`, Qwen2.5-VL as `qwen2vl`, SmolVLM / Idefics3 as `llama`), written by gguf_file from a
temp folder holding only the language model's config and tensors. `mmproj-<name>.gguf` holds the
vision tower and projector as llama.cpp's `clip` architecture: tensor names from gguf-py's
MMPROJ name map, the `clip.*` keys its tools/mtmd/clip.cpp reads for the projector type.

What gguf-py's map does not do, and llama.cpp's convert_hf_to_gguf.py does per family, is here:
- Qwen2.5-VL: the fused `attn.qkv` split into q / k / v, the Conv3D patch embedding split into
  its two temporal slices (`v.patch_embd.weight`, `v.patch_embd.weight.1`);
- Gemma 3: the SigLIP pooling head dropped (Gemma 3 never runs it), the projector's
  `mm_input_projection_weight` given its `.weight` suffix, its soft-embedding RMSNorm stored as
  1 + w (llama.cpp multiplies by the stored value), the checkpoint's `vision_tower.` read as
  the original `vision_tower.vision_model.`.
Families llama.cpp does not read this way are refused by name with the reason (NOT_WRITTEN).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from loratune.export.gguf_arch import GGUFExportError, hf_config, supported

# Vision-language families loratune trains but does not write as GGUF, and why.
NOT_WRITTEN = {
    "qwen3_vl": "llama.cpp reads it as the qwen3vl text architecture (deepstack features added "
                "into the first text layers) plus a qwen3vl_merger mmproj with deepstack "
                "mergers; loratune does not write those yet",
    "llava": "llama.cpp's convert_hf_to_gguf.py reads LlavaForConditionalGeneration only with a "
             "Pixtral tower; LLaVA-1.5's CLIP tower goes through its legacy surgery scripts, "
             "which loratune does not reproduce",
    "llava_next": "llama.cpp's convert_hf_to_gguf.py has no LLaVA-NeXT mmproj (anyres tiles and "
                  "image_newline go through its legacy surgery scripts), which loratune does "
                  "not reproduce",
    "mllama": "llama.cpp's mtmd has no projector for Llama 3.2 Vision's cross-attention layers "
              "(its text layers read image states llama.cpp never computes)",
}


@dataclass(frozen=True)
class Projector:
    """One family's mmproj: its llama.cpp projector type and what differs from the common keys
    and from gguf-py's name map."""

    projector_type: str                        # gguf.VisionProjectorType value
    text_arch: str                             # the language model's gguf_arch.FAMILIES key
    keys: Callable                             # keys(writer, hf, preprocessor)
    split: Callable | None = None              # split(name, tensor) -> [(gguf name, tensor)]
    skip: tuple[str, ...] = ()                 # checkpoint name parts llama.cpp never reads
    norm_offset: tuple[str, ...] = ()          # RMSNorm weights stored as 1 + w


def _gemma3_keys(writer, hf, pre: dict) -> None:
    v = hf.vision_config
    writer.add_vision_attention_layernorm_eps(float(v.layer_norm_eps))
    writer.add_vision_use_gelu(True)
    # llama.cpp pools the patch grid by 4 per side unless told otherwise
    factor = (v.image_size // v.patch_size) // int(round(hf.mm_tokens_per_image ** 0.5))
    if factor != 4:
        writer.add_vision_projector_scale_factor(int(factor))


def _idefics3_keys(writer, hf, pre: dict) -> None:
    writer.add_vision_attention_layernorm_eps(float(hf.vision_config.layer_norm_eps))
    writer.add_vision_projector_scale_factor(int(hf.scale_factor))
    writer.add_vision_use_gelu(True)
    longest = (pre.get("size") or {}).get("longest_edge")
    if longest:
        writer.add_vision_preproc_image_size(int(longest))


def _qwen2_5_vl_keys(writer, hf, pre: dict) -> None:
    v = hf.vision_config
    full = list(v.fullatt_block_indexes)
    # llama.cpp alternates window and full attention with one period: every n-th block full
    period = full[0] + 1 if full else 0
    if not full or any(b - a != period for a, b in zip(full, full[1:])):
        raise GGUFExportError(f"config.json: vision_config.fullatt_block_indexes={full}; "
                              "llama.cpp's qwen2.5vl_merger needs evenly spaced full-attention "
                              "blocks (n_wa_pattern)")
    writer.add_vision_use_silu(True)
    writer.add_vision_n_wa_pattern(period)
    # clip.cpp defaults both to Qwen2.5-VL's released values (2, 112 pixels); written so a
    # model trained with others is not run with those
    writer.add_vision_spatial_merge_size(int(v.spatial_merge_size))
    writer.add_vision_window_size(int(v.window_size))
    writer.add_vision_attention_layernorm_eps(1e-6)  # Qwen2.5-VL's RMSNorm eps (hard-coded)


def _qwen2_5_vl_split(name: str, t: torch.Tensor):
    """The fused qkv as q, k, v (rows in thirds); the Conv3D patch kernel [out, 3, 2, p, p] as
    its two temporal slices, which llama.cpp convolves separately and adds."""
    import gguf

    if ".attn.qkv." in name:
        return [(name.replace(".qkv.", f".{part}."), chunk)
                for part, chunk in zip("qkv", t.chunk(3, dim=0))]
    if name.endswith("patch_embed.proj.weight"):
        base = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_ENC_EMBD_PATCH] + ".weight"
        if t.dim() != 5 or t.shape[2] != 2:
            raise GGUFExportError(f"{name}: shape {list(t.shape)}; llama.cpp reads a temporal "
                                  "patch size of 2")
        return [(base, t[:, :, 0]), (base + ".1", t[:, :, 1])]
    return None


PROJECTORS = {
    "gemma3": Projector("gemma3", "Gemma3ForCausalLM", _gemma3_keys, skip=(".head.",),
                        norm_offset=("mm_soft_emb_norm.weight",)),
    "qwen2_5_vl": Projector("qwen2.5vl_merger", "Qwen2_5_VLForCausalLM", _qwen2_5_vl_keys,
                            split=_qwen2_5_vl_split),
    "idefics3": Projector("idefics3", "LlamaForCausalLM", _idefics3_keys),
    "smolvlm": Projector("idefics3", "LlamaForCausalLM", _idefics3_keys),
}


def projector_of(model_type: str, where: str) -> Projector:
    return supported(PROJECTORS, NOT_WRITTEN, model_type, "vision-language model_type", where)


def refuse_vlm_adapter_only(base: Path) -> None:
    """`--adapter-only` of a vision-language base, refused with why (not the text families'
    list of supported architectures)."""
    from loratune.models.vision import vision_model_type

    model_type = vision_model_type(base)
    if model_type is not None:
        raise GGUFExportError(f"{base}: --adapter-only of a vision-language model "
                              f"({model_type}) is not written: llama.cpp applies an adapter GGUF "
                              "to the language model file alone and loads none for the mmproj, "
                              "and loratune does not rename a VLM adapter to the text file's "
                              "tensors yet; export with the adapter merged (drop --adapter-only)")


def mmproj_path(out: Path) -> Path:
    """Where the projector goes: beside the language model, as llama.cpp names it."""
    return Path(out).with_name(f"mmproj-{Path(out).name}")


def _stored_parts(folder: Path, model_type: str) -> tuple[dict[str, str], dict[str, str]]:
    """({checkpoint name: language-model name as a text checkpoint}, {checkpoint name: name
    as loaded}) of the vision tower's and projector's tensors; the split by module path is the
    family's (models/vision.py), the loaded names transformers' own renames (vlm_merge)."""
    from loratune.export.vlm_merge import vision_checkpoint
    from loratune.models.vision import FAMILIES

    family = FAMILIES[model_type]
    text, vision = {}, {}
    for loaded, stored in vision_checkpoint(folder).names.items():
        if loaded.startswith(family.language + "."):
            text[stored] = "model." + loaded[len(family.language) + 1:]
        elif loaded == "lm_head.weight":
            text[stored] = loaded
        elif loaded.startswith((family.vision + ".", family.projector + ".")):
            vision[stored] = loaded
        else:
            raise GGUFExportError(f"{folder}: tensor {stored} belongs to neither the language "
                                  f"model ({family.language}) nor the vision tower "
                                  f"({family.vision}) or projector ({family.projector})")
    return text, vision


def _shards(folder: Path, names: dict[str, str]) -> Iterator[dict[str, torch.Tensor]]:
    """{new name: tensor} of the checkpoint tensors named in `names`, one shard at a time."""
    from loratune.models.load import weight_files
    from loratune.readers import open_safetensors

    for shard in weight_files(folder):
        with open_safetensors(shard) as f:
            yield {names[k]: f.get_tensor(k) for k in f.keys() if k in names}


def _tensors(folder: Path, names: dict[str, str]) -> Iterator[tuple[str, torch.Tensor]]:
    for shard in _shards(folder, names):
        yield from shard.items()


def text_folder(folder: Path, work: Path, config: dict, text_arch: str) -> Path:
    """The language model alone as a text checkpoint folder (config.json + safetensors) in
    `work`, named as `folder` (the GGUF's general.name)."""
    from safetensors.torch import save_file

    text, _ = _stored_parts(folder, config["model_type"])
    out = work / folder.name
    out.mkdir(parents=True)
    cfg = hf_config(config).text_config.to_dict()
    # tied when the checkpoint has no output layer of its own (safetensors keeps one copy)
    tied = "lm_head.weight" not in text.values()
    cfg.update(architectures=[text_arch], tie_word_embeddings=tied)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for i, shard in enumerate(_shards(folder, text)):
        save_file({k: t.contiguous() for k, t in shard.items()},
                  str(out / f"model-{i:05d}.safetensors"))
    return out


def _common_keys(writer, hf, pre: dict, where: Path) -> None:
    """The keys clip.cpp's load_hparams requires of every vision projector."""
    import gguf

    v = hf.vision_config
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_clip_has_vision_encoder(True)
    writer.add_vision_projection_dim(int(hf.text_config.hidden_size))
    # Qwen2.5-VL has no fixed image size; llama.cpp's converter writes 560 and clip.cpp
    # replaces it with its own limit
    writer.add_vision_image_size(int(getattr(v, "image_size", None) or 560))
    writer.add_vision_patch_size(int(v.patch_size))
    writer.add_vision_embedding_length(int(v.hidden_size))
    writer.add_vision_feed_forward_length(int(v.intermediate_size))
    layers = getattr(v, "num_hidden_layers", None) or v.depth
    writer.add_vision_block_count(int(layers))
    writer.add_vision_head_count(int(getattr(v, "num_attention_heads", None) or v.num_heads))
    for key in ("image_mean", "image_std"):
        if len(pre.get(key) or ()) != 3:
            raise GGUFExportError(f"{where}: {key} must hold 3 values (one per RGB channel); "
                                  "clip.cpp normalizes images with it")
    writer.add_vision_image_mean([float(x) for x in pre["image_mean"]])
    writer.add_vision_image_std([float(x) for x in pre["image_std"]])


def _gguf_names(loaded: str) -> list[str]:
    """Names gguf-py's MMPROJ map may know a loaded-model tensor by: the checkpoint's original
    ones (convert_hf_to_gguf reads those), without transformers' `model.` prefix."""
    name = loaded.removeprefix("model.")
    name = name.replace("mm_input_projection_weight", "mm_input_projection.weight")
    return [name, loaded, name.replace("vision_tower.", "vision_tower.vision_model.", 1)]


def _mmproj_tensors(folder: Path, projector: Projector, n_layers: int):
    """(gguf name, tensor) of the vision tower and projector, as llama.cpp's clip reads them."""
    import gguf

    # the projector's numbered layers (Qwen's merger.mlp.0 / .2 -> mm.0 / mm.2) use the map's
    # block slot too: a tower shallower than them must not hide their names
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, max(n_layers, 8))
    _, vision = _stored_parts(folder, json.loads((folder / "config.json").read_text())
                              ["model_type"])
    for loaded, t in _tensors(folder, vision):
        if any(part in loaded for part in projector.skip):
            continue
        if loaded.endswith(projector.norm_offset):
            t = t.float() + 1.0
        split = projector.split(loaded.removeprefix("model."), t) if projector.split else None
        for name, part in split or [(loaded, t)]:
            if split and name.startswith("v."):  # already llama.cpp's name
                yield name, part
                continue
            found = next((n for n in (names.get_name(c, try_suffixes=(".weight", ".bias"))
                                      for c in _gguf_names(name)) if n), None)
            if found is None:
                raise GGUFExportError(f"tensor {name} has no name in llama.cpp's mmproj (clip) "
                                      f"architecture for projector {projector.projector_type}")
            yield found, part


def _mmproj_kind(name: str, t: torch.Tensor, out_type: str) -> str:
    """f32 for --type f32; otherwise f16 matrices with norms, biases and the patch / position
    embeddings in f32 (as llama.cpp's converter forces them)."""
    if out_type == "f32" or t.dim() < 2 or "patch_embd" in name or "position_embd" in name:
        return "f32"
    return "f16"


def write_mmproj(folder: Path, out: Path, out_type: str = "f16",
                 overwrite: bool = False) -> Path:
    """The vision tower and projector of the VLM in `folder` as llama.cpp's mmproj GGUF."""
    import gguf

    from loratune.export.gguf_file import _encode, _finish, _target

    config = json.loads((folder / "config.json").read_text())
    projector = projector_of(config.get("model_type"), str(folder / "config.json"))
    hf = hf_config(config)
    pre_path = folder / "preprocessor_config.json"
    pre = json.loads(pre_path.read_text()) if pre_path.is_file() else {}
    out, tmp = _target(out, overwrite, [folder])
    try:
        writer = gguf.GGUFWriter(str(tmp), "clip")
        writer.add_name(folder.name)
        writer.add_file_type(0 if out_type == "f32" else 1)
        _common_keys(writer, hf, pre, pre_path)
        writer.add_clip_projector_type(projector.projector_type)
        projector.keys(writer, hf, pre)
        v = hf.vision_config
        layers = getattr(v, "num_hidden_layers", None) or v.depth
        for name, t in _mmproj_tensors(folder, projector, int(layers)):
            array, raw = _encode(t, _mmproj_kind(name, t, out_type))
            writer.add_tensor(name, array, raw_dtype=raw)
        _finish(writer, tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def check_vlm_export(folder: Path, out: Path, overwrite: bool) -> Projector:
    """The family's projector, or the refusal naming why; the mmproj path checked free."""
    from loratune.files import check_new_file

    config = json.loads((folder / "config.json").read_text())
    projector = projector_of(config.get("model_type"), str(folder / "config.json"))
    check_new_file(mmproj_path(out), overwrite)
    return projector


def write_vlm_gguf(folder: Path, out: Path, out_type: str = "f16",
                   tokenizer_pre: str | None = None, overwrite: bool = False) -> tuple[Path, Path]:
    """(language model GGUF, mmproj GGUF) of the VLM in `folder`: both or neither (the mmproj,
    written first, removed when the language model is refused)."""
    from loratune.export.gguf_file import write_gguf

    projector = check_vlm_export(folder, out, overwrite)  # refused before the slow part
    config = json.loads((folder / "config.json").read_text())
    mmproj = write_mmproj(folder, mmproj_path(out), out_type, overwrite)
    work = Path(tempfile.mkdtemp(prefix="loratune-vlm-"))
    try:
        text = text_folder(folder, work, config, projector.text_arch)
        gguf_out = write_gguf(text, out, out_type, tokenizer_pre=tokenizer_pre,
                              overwrite=overwrite, tokenizer_folder=folder)
    except BaseException:
        mmproj.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return gguf_out, mmproj
