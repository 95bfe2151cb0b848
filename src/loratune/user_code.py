"""User code a config names as `path/to/file.py:function` (or, where the option allows it,
`module:function`): imported and checked callable. One loader for GRPO's reward functions and
data.filter, so both say the same things about a missing file or function."""

from __future__ import annotations

import importlib
import importlib.util
import re
from collections.abc import Callable
from pathlib import Path


def load_function(ref: str, noun: str, error: type[Exception]) -> Callable:
    """The function `ref` names (the caller has checked its form: `where:attr`); errors are
    `error`s that start with `noun` ("reward", "data.filter") and name the file or module."""
    where, _, attr = ref.rpartition(":")
    try:
        module = _load_file(where, noun, error) if where.endswith(".py") else \
            importlib.import_module(where)
    except error:
        raise
    except Exception as err:  # noqa: BLE001 - user code can raise anything while importing
        raise error(f"{noun} {ref!r}: importing {where} failed: {type(err).__name__}: "
                    f"{err}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise error(f"{noun} {ref!r}: {where} has no function {attr!r}")
    return fn


def _load_file(path: str, noun: str, error: type[Exception]):
    file = Path(path)
    if not file.is_file():
        raise error(f"{noun} file {path}: not found (relative paths start from the working "
                    f"directory {Path.cwd()})")
    name = re.sub(r"\W", "_", f"loratune_{noun}_{file.stem}")
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
