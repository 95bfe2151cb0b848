"""The export jobs behind `merge`, `export hf` and `export gguf`: base -> merged folder ->
GGUF -> Modelfile. The commands parse their flags into a config; everything after is here.

Each job checks its output path against its inputs before the slow part, works in a temp
folder it removes whatever happens, and prints one line per file it wrote.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from loratune.files import check_new_file, check_output_path, existing_paths
from loratune.progress import stage


@contextmanager
def _base(model: str):
    """The base model as a safetensors folder; a converted copy (from a .gguf or an embedded
    model) lives in a temp folder removed on the way out."""
    from loratune.export.merge import base_folder

    with stage(f"reading the base {model}"):
        base, tmp = base_folder(model)
    try:
        yield base
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def write_merged(cfg, adapter_dirs: list[str] = (), weights: list[float] | None = None,
                 qlora: str | None = None, check: bool = False) -> None:
    """`merge` (adapters given) and `export hf` (none): a Hugging Face folder at cfg.out.
    With `qlora` the base goes through the 4-bit round trip the adapter was trained on; with
    `check` the merged model's logits are compared with base + adapter."""
    from loratune.config import QuantConfig
    from loratune.export.merge import merge_folder, nf4_round_trip, read_adapters
    from loratune.export.vlm_merge import vision_checkpoint

    check_output_path(cfg.out, existing_paths(cfg.model, *adapter_dirs))  # a gguf model file
    adapters = read_adapters(list(adapter_dirs), weights)
    with _base(cfg.model) as base:
        vision = vision_checkpoint(base)  # a VLM's adapters renamed to its checkpoint's names
        adapters = adapters if vision is None else [vision.rename_adapter(a) for a in adapters]
        transform = None
        if qlora:
            config = json.loads((base / "config.json").read_text())
            transform = nf4_round_trip(config, QuantConfig(type=qlora),
                                       None if vision is None else vision.quantized)
        with stage(f"writing {cfg.out} ({len(adapters)} adapter(s) merged)"):
            report = merge_folder(base, adapters, Path(cfg.out), dtype=cfg.dtype,
                                  shard_size=cfg.shard_size, overwrite=cfg.overwrite,
                                  transform=transform)
    print(f"wrote {report.out}: {report.merged_modules} layers merged from {len(adapters)} "
          f"adapter(s), {report.shards} shard(s), {report.seconds:.1f} s")
    if check and adapters:
        from loratune.export.check import merged_logit_gap

        with stage("checking the merged model against base + adapter"):
            gap = merged_logit_gap(cfg.model, list(adapter_dirs), weights, report.out, qlora)
        print(f"max |logit difference| merged vs base + adapter{' (4-bit base)' if qlora else ''}: "
              f"{gap:.3g}")


def export_gguf(cfg) -> Path:
    """`export gguf`: one GGUF file at cfg.out (the adapters merged in), or with
    `adapter_only` the one LoRA adapter as a GGUF LoRA file; a Modelfile beside it unless
    `modelfile` is off."""
    check_output_path(cfg.out, existing_paths(cfg.model, *cfg.adapter))
    if cfg.modelfile:  # refused before the GGUF is written, not after
        check_new_file(Path(cfg.out).with_suffix(".Modelfile"), cfg.overwrite)
    with _base(cfg.model) as base:
        out = _adapter_gguf(cfg, base) if cfg.adapter_only else _merged_gguf(cfg, base)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {cfg.type})")
    return out


def _adapter_gguf(cfg, base: Path) -> Path:
    """The adapter alone; its Modelfile names the base as FROM and the file as ADAPTER."""
    from loratune.export.gguf_file import write_lora_gguf

    from loratune.export.gguf_vision import refuse_vlm_adapter_only

    if len(cfg.adapter) != 1:
        raise ValueError("--adapter-only exports exactly one --adapter")
    refuse_vlm_adapter_only(base)
    out = write_lora_gguf(Path(cfg.adapter[0]), base, Path(cfg.out), cfg.type
                          if cfg.type in ("f32", "f16") else "f32", cfg.overwrite)
    if cfg.modelfile:
        with _adapter_tokenizer(base, Path(cfg.adapter[0])) as folder:
            _write_modelfile(out, folder, cfg.overwrite, base_ref=ollama_base(cfg.model, base))
    return out


@contextmanager
def _adapter_tokenizer(base: Path, adapter: Path):
    """The folder whose tokenizer the adapter's Modelfile describes: the base's, with the chat
    template the adapter was trained with (its chat_template.jinja) where it stores one; the
    adapter GGUF holds no tokenizer, so Ollama prompts it through the Modelfile's TEMPLATE."""
    from loratune.data.templates import adapters_template
    from loratune.export.merge import side_files_with_template

    stored = adapters_template([adapter])
    if stored is None:
        yield base
        return
    work = Path(tempfile.mkdtemp(prefix="loratune-template-"))
    try:
        yield side_files_with_template(base, work / "tokenizer", stored[0])
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _merged_gguf(cfg, base: Path) -> Path:
    """The base with every adapter merged in (through a temp folder), as one GGUF file (two
    for a vision-language model)."""
    from loratune.export.gguf_vision import check_vlm_export
    from loratune.export.merge import merge_folder, read_adapters
    from loratune.export.vlm_merge import vision_checkpoint
    from loratune.models.mxfp4 import is_mxfp4

    source, work = base, None
    vision = vision_checkpoint(base)  # a VLM: its language model plus an mmproj file
    if vision is not None:  # refused, or its mmproj path taken, before the merge
        check_vlm_export(base, Path(cfg.out), cfg.overwrite)
    try:
        # MXFP4 experts (GPT-OSS as released) are decoded by the streamed merge, adapters or not
        if cfg.adapter or is_mxfp4(json.loads((base / "config.json").read_text())):
            work = Path(tempfile.mkdtemp(prefix="loratune-merge-"))
            adapters = read_adapters(cfg.adapter, cfg.weights) if cfg.adapter else []
            if vision is not None:  # renamed to the checkpoint's names, as `merge` does
                adapters = [vision.rename_adapter(a) for a in adapters]
            what = (f"merging {len(cfg.adapter)} adapter(s) into the base" if cfg.adapter
                    else "decoding the MXFP4 experts")
            with stage(what):
                source = merge_folder(base, adapters, work / "merged").out
        with stage(f"writing {cfg.out} ({cfg.type})"):
            out = _write_gguf_files(source, cfg, vision is not None)
        if cfg.modelfile:
            _write_modelfile(out, source, cfg.overwrite)
        return out
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)


def _write_gguf_files(source: Path, cfg, vlm: bool) -> Path:
    """The GGUF at cfg.out; for a vision-language model also its mmproj file beside it."""
    if not vlm:
        from loratune.export.gguf_file import write_gguf

        return write_gguf(source, Path(cfg.out), cfg.type, tokenizer_pre=cfg.tokenizer_pre,
                          overwrite=cfg.overwrite, round_yarn=cfg.round_yarn)
    from loratune.export.gguf_vision import write_vlm_gguf

    out, mmproj = write_vlm_gguf(source, Path(cfg.out), cfg.type,
                                 tokenizer_pre=cfg.tokenizer_pre, overwrite=cfg.overwrite)
    print(f"wrote {mmproj} ({mmproj.stat().st_size / 2**20:.1f} MiB): llama-mtmd-cli -m {out} "
          f"--mmproj {mmproj}")
    return out


def ollama_base(model: str, folder: Path) -> str:
    """What an adapter's Modelfile names as FROM: the base as a GGUF file where there is one
    (a .gguf --model, an embedded model's source), else its safetensors folder."""
    from loratune.export.gguf_tokenizer import source_gguf
    from loratune.models.load import resolve_model

    found, gguf = resolve_model(model)
    if gguf is not None:
        return str((found / gguf).resolve())
    return str(source_gguf(found) or found.resolve())


def _write_modelfile(out: Path, folder: Path, overwrite: bool,
                     base_ref: str | None = None) -> None:
    from loratune.export.modelfile import write_modelfile

    path = write_modelfile(out, folder, base_ref, overwrite)
    print(f"wrote {path}: ollama create NAME -f {path}")
