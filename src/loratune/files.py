"""Writes that lose nothing: fill a hidden temp sibling, fsync it, rename it into place.

A temp is named `.<name>.tmp-<pid>-<random>` beside its target, and a folder being replaced
is first moved to `.<name>.old-<pid>`. The pid lets a later start tell the leftovers of a
killed process from a write still in progress; `remove_stale_temps` removes the former (and
moves a lost previous version back). Output paths are checked against the inputs they are
made from and against folders no tool should replace (the current directory, home).

This module is the bottom of the import graph: it imports nothing from loratune.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path


class OutputPathError(ValueError):
    """An output path that would replace an input or a folder that is not ours to replace."""


# --- checks -------------------------------------------------------------------------------


def check_output_path(out: str | Path, inputs: Iterable[str | Path | None]) -> None:
    """Refuse an output that is an input, holds one, or lies inside an input folder.

    Replacing `out` deletes everything under it, and writing inside an input folder can
    clobber a file being read, so all three relations are refused (symlinks resolved)."""
    target = Path(out).expanduser().resolve()
    for given in inputs:
        if given is None:
            continue
        src = Path(given).expanduser().resolve()
        if target == src:
            raise OutputPathError(f"output {out} is the input {given}; choose another path")
        if target in src.parents:
            raise OutputPathError(f"output {out} contains the input {given}; replacing it would "
                                  "delete the input: choose a path outside it")
        if src in target.parents:
            raise OutputPathError(f"output {out} is inside the input folder {given}; choose a "
                                  "path outside it (writing there could clobber what is read)")


def existing_paths(*names: str | Path | None) -> list[Path]:
    """The inputs of a command that are paths on disk (an embedded model's name is not), for
    `check_output_path`."""
    return [Path(n).expanduser() for n in names if n and Path(n).expanduser().exists()]


def protected_reason(folder: str | Path) -> str | None:
    """Why `folder` must never be replaced or moved away (None if it may be)."""
    target = Path(folder).expanduser().resolve()
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if target == cwd:
        return "it is the current directory"
    if target in cwd.parents:
        return "it holds the current directory"
    if target == home:
        return "it is the home directory"
    if target in home.parents:
        return "it holds the home directory"
    return None


def check_new_file(out: Path, overwrite: bool) -> None:
    """Refuse a file output that is a folder, or exists and may not be replaced."""
    if out.is_dir():
        raise OutputPathError(f"{out} is a folder; expected a file path")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")


def check_new_dir(out: Path, overwrite: bool, marker: str | None = None) -> None:
    """Refuse a folder output that may not be replaced: without overwrite, a file, cwd/home,
    or (with `marker`) a non-empty folder not holding `marker`, i.e. not one we wrote."""
    if not out.exists():
        return
    if not overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    if not out.is_dir():
        raise OutputPathError(f"{out} is a file; expected a folder path")
    reason = protected_reason(out)
    if reason:
        raise OutputPathError(f"refusing to replace {out}: {reason}; choose another path")
    if marker and any(out.iterdir()) and not (out / marker).exists():
        raise OutputPathError(f"refusing to replace {out}: it does not look like our output "
                              f"(no {marker}); remove it yourself or choose another path")


# --- fsync --------------------------------------------------------------------------------


def fsync_path(path: str | Path) -> None:
    """Flush one file or folder entry list to disk (folders: not on Windows, which can't)."""
    if os.name == "nt" and Path(path).is_dir():
        return
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then each folder after its contents, `root` last."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(os.path.join(folder, name))
        fsync_path(folder)


# --- temp names and leftovers -------------------------------------------------------------

_ENTRY = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)"
                    r"(?:-(?P<pid>\d+)(?:-\w{8})?|\w{8})?$")  # no pid: older loratune's names


def _alive(pid: int) -> bool:
    if os.name == "nt":
        return True  # os.kill would terminate it there; keep the temp
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True  # another user's live process
    except (ProcessLookupError, OverflowError):
        return False
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temps(folder: Path, name: str | None = None) -> list[Path]:
    """Remove what killed writes left in `folder` (only those for `name`, if given).

    A leftover `.old` whose target is missing is the previous version, moved aside just
    before the kill: it is renamed back instead. Temps of live processes are left alone."""
    if not folder.is_dir():
        return []
    removed = []
    for entry in sorted(folder.iterdir()):
        m = _ENTRY.match(entry.name)
        if not m or (name is not None and m["name"] != name):
            continue
        if m["pid"] and _alive(int(m["pid"])):
            continue
        target = folder / m["name"]
        if m["kind"] == "old" and not target.exists():
            os.replace(entry, target)
            continue
        _remove(entry)
        removed.append(entry)
    return removed


def temp_file_for(out: Path, overwrite: bool) -> Path:
    """Check that file `out` may be written, clear leftovers of killed writes to it, and
    name a fresh temp beside it. The writer creates the temp, so it gets the usual mode."""
    remove_stale_temps(out.parent, out.name)
    check_new_file(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.with_name(f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def remove_dir(folder: Path) -> None:
    """Delete a folder so that a kill midway leaves a temp name, never a half-empty folder
    under its real (loadable-looking) name."""
    doomed = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-{os.getpid()}-",
                                   dir=folder.parent))
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


# --- publishing ---------------------------------------------------------------------------


def publish_file(tmp: Path, out: Path) -> None:
    """Rename a finished temp file into place: its data reaches disk before the rename, and
    the rename itself before we return."""
    fsync_path(tmp)
    os.replace(tmp, out)
    fsync_path(out.parent)


def write_atomic_file(out: str | Path, fill: Callable[[Path], None],
                      overwrite: bool = False) -> Path:
    """Create file `out` by `fill(temp path)`, then publish it; a crash leaves `out` as it was."""
    out = Path(out)
    tmp = temp_file_for(out, overwrite)
    try:
        fill(tmp)
        publish_file(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _publish_dir(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.replace(tmp, out)
        fsync_path(out.parent)
        return
    # A folder cannot be renamed over a non-empty one: move the old aside first. A kill
    # between the two renames leaves it as `.old`, which remove_stale_temps puts back.
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    _remove(old)
    os.replace(out, old)
    os.replace(tmp, out)
    fsync_path(out.parent)  # both renames on disk before the old version goes
    shutil.rmtree(old, ignore_errors=True)


def write_atomic_dir(out: str | Path, fill: Callable[[Path], None], overwrite: bool = False,
                     marker: str | None = None) -> Path:
    """Create folder `out` by filling a temp sibling, then renaming it into place.

    Everything is fsync'ed before the rename, and the parent after it, so a crash leaves
    either the old folder or the complete new one. `marker`: see check_new_dir."""
    out = Path(out)
    remove_stale_temps(out.parent, out.name)
    check_new_dir(out, overwrite, marker)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        fill(tmp)
        os.chmod(tmp, 0o755)
        fsync_tree(tmp)
        _publish_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
