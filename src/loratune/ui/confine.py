"""What a run started from the dashboard may read and where it may write.

The dashboard starts `loratune train` for whoever reaches its API, so a launched config is held
to the files its operator meant to offer: every option the config schema marks as a user path
(`json_schema_extra={"user_path": ...}` in loratune.config: model folders, data files,
init_from, the DeepSpeed config, the MLflow store) must lie, after its links are resolved, in
the runs folder or a folder given with `--data-root` (default: the current directory). A path
that is not checked could make train read /etc/passwd as a data file and print its first
lines into the console log the dashboard serves. A remote tracker URI (http://, a database) is
refused unless the dashboard was started with `--allow-remote-tracker`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel

from loratune.config import RunConfig
from loratune.data.bundled import BUNDLED
from loratune.data.record_filter import FUNCTION_REF
from loratune.models.load import EMBEDDED

# Values of a user-path option that name something the package ships, not a file.
NAMED = {"model.name": set(EMBEDDED), "data.train": set(BUNDLED), "data.eval": set(BUNDLED)}
LOCAL_SCHEMES = ("", "file", "sqlite")   # MLflow stores on this machine: paths to check


@dataclass(frozen=True)
class Confinement:
    """The folders launched runs may read (resolved) and whether remote trackers are allowed."""

    roots: tuple[Path, ...]
    allow_remote_tracker: bool = False

    @classmethod
    def of(cls, runs: Path, data_roots=(), allow_remote_tracker: bool = False):
        """The runs folder plus `data_roots` (default: the current directory)."""
        given = [Path(p).expanduser() for p in data_roots] or [Path.cwd()]
        roots = tuple(Path(os.path.realpath(p)) for p in [runs, *given])
        return cls(roots, allow_remote_tracker)

    def refusal(self, cfg: RunConfig) -> tuple[str, str] | None:
        """(dotted option, why) for the first user path of `cfg` out of bounds, else None."""
        for key, kind, value in user_paths(cfg):
            if value is None or value in NAMED.get(_option(key), ()):
                continue
            why = self._uri(value) if kind == "uri" else self._local(key, value)
            if why:
                return key, why
        for i, spec in enumerate(cfg.train.rl.rewards):
            why = self._reward(spec.function)
            if why:
                return f"train.rl.rewards.{i}.function", why
        if cfg.data.filter and FUNCTION_REF.fullmatch(cfg.data.filter.strip()):
            # user code too: its file must lie in an offered folder (an expression runs no code)
            why = self._path(cfg.data.filter.strip().rpartition(":")[0])
            if why:
                return "data.filter", why
        return None

    def _reward(self, function: str) -> str | None:
        """A GRPO reward runs user code in the run: a file under the offered folders, or none."""
        where, sep, _ = function.rpartition(":")
        if not sep:   # a built-in
            return None
        if where.endswith(".py"):
            return self._path(where)
        return (f"{function}: a module reward is refused from the dashboard (it imports code "
                "from anywhere); give path/to/file.py:function in an offered folder")

    def _local(self, key: str, value: str) -> str | None:
        """A path option: no glob (a `**` would follow links out of the folder) and, for data,
        an existing file or folder (a missing one would be fetched as a Hub dataset id)."""
        if any(c in value for c in "*?["):
            return (f"{value}: a glob is refused from the dashboard (it can follow links out of "
                    "the offered folders); name the files or their folder")
        if key.startswith("data.") and not Path(value).expanduser().exists():
            return (f"{value}: no such file or folder (a Hub dataset id is refused from the "
                    "dashboard: save it to a folder with datasets' save_to_disk first)")
        return self._path(value)

    def _path(self, value: str) -> str | None:
        real = Path(os.path.realpath(Path(value).expanduser()))
        if any(real == root or root in real.parents for root in self.roots):
            return None
        return (f"{value} is outside the folders launched runs may read "
                f"({', '.join(map(str, self.roots))}): start the dashboard with "
                f"--data-root FOLDER to offer another folder")

    def _uri(self, value: str) -> str | None:
        parts = urlsplit(value)
        scheme = parts.scheme.lower() if len(parts.scheme) > 1 else ""   # C:\ is a path
        if scheme in LOCAL_SCHEMES:
            # sqlite:///rel.db and sqlite:////abs.db (SQLAlchemy), file:///abs, or a plain path
            path = {"": value, "file": unquote(parts.path),
                    "sqlite": unquote(parts.path)[1:]}[scheme]
            return self._path(path)
        if self.allow_remote_tracker:
            return None
        return (f"{value}: a remote tracker is refused from the dashboard: start it with "
                "--allow-remote-tracker to allow one, or give a local path")


def user_paths(cfg: RunConfig):
    """(dotted option, 'path' or 'uri', value) for each option of `cfg` the schema marks."""
    for name in type(cfg).model_fields:
        section = getattr(cfg, name)
        if not isinstance(section, BaseModel):
            continue
        for key, field in type(section).model_fields.items():
            kind = (field.json_schema_extra or {}).get("user_path") \
                if isinstance(field.json_schema_extra, dict) else None
            if kind:
                yield from _values(f"{name}.{key}", kind, getattr(section, key))


def _values(key: str, kind: str, value):
    """A list of sources (data.train/data.eval as a mixture): each source's path, as
    data.train.0.path; other values as they are."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            yield f"{key}.{i}.path", kind, item.path
    else:
        yield key, kind, value


def _option(key: str) -> str:
    """data.train.0.path -> data.train: a source may name a bundled set as the option may."""
    return ".".join(key.split(".")[:2])
