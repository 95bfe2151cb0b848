"""Opening the files loratune reads back (safetensors, JSON state): one-line errors naming the file.

safetensors' own errors ("Error while deserializing header: ...") name no file, and a file cut
short by a full disk or a killed copy only shows when it is opened; every safetensors file
loratune reads (adapters, checkpoints, model weights) is opened here, so a damaged one is always
a `CorruptFileError` that says which file it is.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file


class CorruptFileError(ValueError):
    """A file that exists but cannot be used as what it claims to be; the message names it."""


def _unreadable(path: Path, err: Exception) -> CorruptFileError:
    if not Path(path).exists():
        return CorruptFileError(f"{path}: file missing")
    if not Path(path).is_file():
        return CorruptFileError(f"{path}: not a file (a safetensors file was expected)")
    return CorruptFileError(f"{path}: not a readable safetensors file ({err}); the file is "
                            "truncated or damaged")


@contextmanager
def open_safetensors(path: str | Path):
    """`safe_open(path)` whose header is checked against the file's size before any read."""
    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as err:
        raise _unreadable(Path(path), err) from None
    with handle as f:
        yield f


def check_safetensors(path: str | Path) -> list[str]:
    """The tensor names of `path`; a truncated or garbled file raises CorruptFileError.

    Only the header is read: safetensors checks that its offsets cover the file exactly."""
    with open_safetensors(path) as f:
        return list(f.keys())


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of `path`, by name; a truncated or garbled file raises CorruptFileError."""
    check_safetensors(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:  # changed or cut since the check
        raise _unreadable(Path(path), err) from None


def check_finite(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """Refuse NaN or Inf in trained weights: they spread to every output the model gives."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise CorruptFileError(f"{path}: tensor {name} holds NaN or Inf ({bad} of "
                                   f"{tensor.numel()} values); the file is damaged or comes from "
                                   "a run that diverged")


def read_json(path: str | Path) -> object:
    """A JSON file written by loratune; a missing, cut or garbled one raises CorruptFileError."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CorruptFileError(f"{path}: file missing") from None
    except UnicodeDecodeError as err:
        raise CorruptFileError(f"{path}: not UTF-8 (bad byte at offset {err.start}); the file "
                               "is damaged") from None
    except json.JSONDecodeError as err:
        raise CorruptFileError(f"{path}: not valid JSON ({err.msg} at line {err.lineno} column "
                               f"{err.colno}); the file is truncated or damaged") from None
    except RecursionError:   # json's answer to "[[[[..." past the interpreter's limit
        raise CorruptFileError(f"{path}: not valid JSON (nested too deeply); the file is "
                               "truncated or damaged") from None
