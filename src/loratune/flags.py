"""Command-line flags made from a typed command config (`loratune.config.commands`).

One flag per field, its type, choices and help read from the field: a bool is a switch
(`--x/--no-x` when it defaults to true), a Literal gives choices, a list of strings repeats the
flag (`--adapter A --adapter B`), a list of numbers is one comma-separated value
(`--weights 0.7,0.3`, which the field splits). Flags have no argparse defaults: the config class
holds them, so a flag left out cannot hide what `--config FILE` says.

Every command also takes `key=value` overrides (the dotted YAML key, the value read as YAML),
anywhere among its flags: `CommandParser` gathers the ones argparse leaves over.
"""

from __future__ import annotations

import argparse
import re
import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic.fields import FieldInfo

from loratune.config.commands import CommandConfig
from loratune.config import parse_override

KEY_VALUE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*=")


class CommandParser(argparse.ArgumentParser):
    """An argparse parser whose commands take `key=value` overrides in any place among their
    flags. argparse fills a `nargs="*"` positional once, at its first chance, so an override
    after a flag (`train CFG --resume train.lr=1e-4`) is left over; such leftovers join
    `args.overrides`, and any other leftover word is the usual 'unrecognized arguments'."""

    def parse_args(self, args=None, namespace=None):
        parsed, extra = self.parse_known_args(args, namespace)
        words = [w for w in extra if not KEY_VALUE.match(w)]
        if words or (extra and not hasattr(parsed, "overrides")):
            self.error(f"unrecognized arguments: {' '.join(words or extra)}")
        if extra:
            parsed.overrides = [*parsed.overrides, *extra]
        return parsed


def add_overrides(p: argparse.ArgumentParser, what: str) -> None:
    """The positional `key=value` words of a command (`what`: whose keys they set)."""
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help=f"override {what}, anywhere among the flags (value read as YAML)")


def add_config_flags(p: argparse.ArgumentParser, cls: type[CommandConfig],
                     overrides: bool = True) -> None:
    """`--config FILE`, one flag per option of `cls` and (`overrides`) `key=value` words that
    set an option by its YAML key."""
    p.add_argument("--config", metavar="FILE.yaml",
                   help="YAML file of these options (keys: the flags' names with '_'; the model's "
                   "under 'model:'); flags given override it")
    if overrides:
        add_overrides(p, "an option by its YAML key, e.g. model.dtype=float32")
    for flag, key in cls.flag_keys().items():
        field = field_at(cls, key)
        spec = cls.FLAGS.get(flag)  # (key, help): the help says it all, defaults included
        text = spec[1] if isinstance(spec, tuple) else _help(field.description, field)
        p.add_argument(flag, dest=_dest(key), default=argparse.SUPPRESS, help=text,
                       **_argparse_kind(field, flag))


def config_from_args(cls: type[CommandConfig], args: argparse.Namespace,
                     overrides: list[str] | None = None):
    """The typed config: `--config`'s file with the flags given on top, then the `key=value`
    overrides (default: the command's own, `args.overrides`)."""
    given = {key: getattr(args, _dest(key)) for key in cls.flag_keys().values()
             if hasattr(args, _dest(key))}
    for item in getattr(args, "overrides", []) if overrides is None else overrides:
        path, value = parse_override(item)
        given[".".join(path)] = value
    return cls.load(getattr(args, "config", None), given)


def field_at(cls, key: str) -> FieldInfo:
    """The field a dotted key names, through sections ('model.quantization.type')."""
    *sections, name = key.split(".")
    for part in sections:
        cls = _plain(cls.model_fields[part].annotation)
    return cls.model_fields[name]


def _dest(key: str) -> str:
    return key.replace(".", "__")


def _plain(annotation):
    """X for `X | None`."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _argparse_kind(field: FieldInfo, flag: str) -> dict[str, Any]:
    kind = _plain(field.annotation)
    metavar = flag.lstrip("-").upper().replace("-", "_")
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction if field.default is True
                else "store_true"}
    if get_origin(kind) is Literal:
        choices = list(get_args(kind))
        return {"choices": choices, "type": type(choices[0])}
    if get_origin(kind) is list:
        item = get_args(kind)[0]
        if item is str:
            return {"action": "append", "metavar": metavar}
        return {"type": str, "metavar": f"{metavar}[,...]"}
    return {"type": kind if kind in (int, float) else str, "metavar": metavar}


def _help(text: str | None, field: FieldInfo) -> str | None:
    default = field.get_default(call_default_factory=True)
    if field.is_required() or default is None or default is False or default == []:
        return text
    return f"{text} (default: {default})" if text else f"default: {default}"


def flags_of(cfg: CommandConfig, keys) -> str:
    """The command line that sets `keys` of `cfg` to their values (for showing, shell-quoted)."""
    import shlex

    flag_of = {key: flag for flag, key in type(cfg).flag_keys().items()}
    words = []
    for key in keys:
        value, flag = cfg, flag_of[key]
        for part in key.split("."):
            value = getattr(value, part)
        if isinstance(value, bool):
            if value or field_at(type(cfg), key).default is True:
                words.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, list):
            words += [w for v in value for w in (flag, str(v))]
        elif value is not None:
            words += [flag, str(value)]
    return shlex.join(words)
