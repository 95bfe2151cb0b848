"""Base models: loading (embedded, HF folder, GGUF; 4-bit bases too) and module discovery."""

from loratune.models.device import DTYPES
from loratune.models.load import (
    EMBEDDED,
    ModelNotFound,
    embedded_folder,
    load_model,
    load_tokenizer,
    resolve_model,
)
from loratune.models.modules import linear_module_names, select_targets

__all__ = [
    "DTYPES",
    "EMBEDDED",
    "ModelNotFound",
    "embedded_folder",
    "linear_module_names",
    "load_model",
    "load_tokenizer",
    "resolve_model",
    "select_targets",
]
