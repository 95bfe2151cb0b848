"""The federated run folder: the global adapter of every round (global/round-NNNN, a PEFT
folder written temp-then-rename), rounds.jsonl (one line per round), and the final adapter.
A resumed run starts after the newest complete round folder, from its tensors."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import torch

from loratune.adapters.peft_format import read_adapter_weights, write_peft_folder
from loratune.files import remove_stale_temps, write_atomic_file
from loratune.train.run_folder import RunFolderError

ROUND_DIR = re.compile(r"round-(\d{4})")
ROUNDS_FILE = "rounds.jsonl"


def round_dirs(out: Path) -> list[tuple[int, Path]]:
    root = out / "global"
    found = [(int(m.group(1)), p) for p in root.glob("round-*")
             if (m := ROUND_DIR.fullmatch(p.name)) and p.is_dir()] if root.is_dir() else []
    return sorted(found)


def prepare_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to start over a run (or resume none) unless asked; with overwrite, the old run
    is moved to a backup name."""
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"output_dir {out} is a file; expected a folder")
    if resume and not round_dirs(out):
        raise RunFolderError(f"{out} has no global/round-* to resume from; run without "
                             "--resume to start")
    if not resume and out.exists() and any(out.iterdir()):
        if not overwrite:
            raise RunFolderError(f"{out} is not empty: pass --resume to continue a federated "
                                 "run, --overwrite to start over, or choose another output_dir")
        backup = out.with_name(f"{out.name}.bak-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(out, backup)
        print(f"previous run moved to {backup}")
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    if (out / "global").is_dir():
        remove_stale_temps(out / "global")


def save_round(out: Path, rnd: int, state: dict[str, torch.Tensor], config: dict) -> Path:
    return write_peft_folder(out / "global" / f"round-{rnd:04d}", state, config, overwrite=True)


def last_round(out: Path) -> tuple[int, dict[str, torch.Tensor]] | None:
    """(round, global adapter) of the newest round folder; None if there is none."""
    found = round_dirs(out)
    if not found:
        return None
    rnd, folder = found[-1]
    return rnd, read_adapter_weights(folder)


def read_rounds(out: Path, upto: int) -> list[dict]:
    """rounds.jsonl's lines of rounds 1..upto (a stopped run may have logged no later one)."""
    path = out / ROUNDS_FILE
    if not path.is_file():
        return []
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return [r for r in lines if r["round"] <= upto]


def write_rounds(out: Path, records: list[dict]) -> None:
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    write_atomic_file(out / ROUNDS_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"),
                      overwrite=True)
