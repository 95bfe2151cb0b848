"""The pieces every config class shares: the section base (unknown keys are errors), the
error a person reads, YAML files and `key=value` overrides, validation that names each bad key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

class ConfigError(ValueError):
    """A configuration problem, worded for the person who wrote the config."""


# Options naming a file or folder the run reads or writes (or a tracker URI): the dashboard
# confines what a launched config may name to these (ui/confine.py).
USER_PATH = {"user_path": "path"}
USER_URI = {"user_path": "uri"}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _format_errors(err: ValidationError, source: str, flags: dict[str, str] | None = None) -> str:
    """One line per problem, naming the key (and its command-line flag, when it has one)."""
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        flag = next((flags[k] for k in _prefixes(key) if k in flags), None) if flags else None
        named = f"key '{key}'" + (f" ({flag})" if flag else "")
        if e["type"] == "extra_forbidden":
            lines.append(f"  unknown key '{key}'")
        elif e["type"] == "missing":
            lines.append(f"  missing {named}")
        elif not key:  # a rule across several keys
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  {named}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def _prefixes(key: str) -> list[str]:
    """'weights.1' -> ['weights.1', 'weights']: the key, then the keys that hold it."""
    parts = key.split(".")
    return [".".join(parts[:n]) for n in range(len(parts), 0, -1)]


def parse_override(item: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (['train', 'lr'], 1e-4); the value is read as YAML."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value, e.g. train.lr=1e-4")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        set_key(data, path, value, f"override '{item}'")
    return data


def set_key(data: dict, path: list[str], value: Any, what: str) -> None:
    """data[path[0]][path[1]]... = value, making the sections on the way."""
    node = data
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{what}: '{part}' is a value, not a section")
        node = child
    node[path[-1]] = value


def validate_config(cls: type[_Section], data: dict, source: str,
                    flags: dict[str, str] | None = None):
    """`cls` from `data`, or a ConfigError naming each bad key (and its flag, from `flags`)."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source, flags)) from None


def read_yaml(path: str | Path) -> dict:
    """The mapping a YAML config file holds; a ConfigError for a missing file or bad YAML."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data
