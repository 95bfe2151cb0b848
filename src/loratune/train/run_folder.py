"""The run folder: what a start may do to it (refusals change nothing) and what it holds.

A run folder holds config.yaml, metrics.jsonl, status.json, checkpoints/, adapter/, loss.png,
the trackers' folders and, once the run finished, run_summary.json. Starting again into one is refused unless it is a resume of an
unfinished run or an --overwrite (which keeps the old folder under a backup name).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from loratune.config import RunConfig
from loratune.files import protected_reason, remove_stale_temps, write_atomic_file
from loratune.train.checkpoint import list_checkpoints

DONE_FILE = "run_summary.json"

# What train and demo write into a run folder. --overwrite moves the folder away, so one
# holding anything else (or cwd, or home) is someone's own files and is refused.
RUN_ENTRIES = {"config.yaml", "metrics.jsonl", "checkpoints", "adapter", DONE_FILE, "loss.png",
               "demo_report.json", "status.json", "ref_logps.safetensors",
               "tensorboard", "mlruns", "wandb"}   # train.report_to's trackers

# What decides the data order and the meaning of a step: a checkpoint written under other values
# would resume on different batches. The world size is free to change.
RESUME_FIELDS = ("batch_size", "grad_accum", "seed")


class RunFolderError(RuntimeError):
    pass


def check_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber a run (unless overwrite, which backs it up); changes nothing."""
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"output_dir {out} is a file; expected a folder")
    if overwrite:
        if out.exists():
            check_replaceable_run(out)
        return
    finished = (out / DONE_FILE).is_file()
    has_ckpt = bool(list_checkpoints(out / "checkpoints"))
    if resume and not finished and not has_ckpt:
        raise RunFolderError(f"{out} has no checkpoint to resume from (checkpoints/step-*); "
                             "run without --resume to start, or --overwrite to start over")
    if not out.exists() or (resume and not finished):
        return
    if finished:
        raise RunFolderError(f"{out} holds a finished run; pass --overwrite to start a new one "
                             "(the old one is kept as a backup), or choose another output_dir")
    if has_ckpt:
        raise RunFolderError(f"{out} holds checkpoints of an unfinished run: pass --resume to "
                             "continue it or --overwrite to start over")
    # config.yaml and status.json alone: a start that never got going (or `loratune ui`'s
    # launch, which writes both before train starts)
    if any(p.name not in ("config.yaml", "status.json") for p in out.iterdir()):
        raise RunFolderError(f"{out} is not empty; pass --overwrite or choose another output_dir")


def check_replaceable_run(out: Path) -> None:
    """Refuse --overwrite of a folder that is not a loratune run, or that is cwd/home/above."""
    reason = protected_reason(out)
    if reason:
        raise RunFolderError(f"output_dir {out} cannot be replaced: {reason}; --overwrite "
                             "moves a run folder away: choose another output_dir")
    # Hidden names are our temps or the system's (.DS_Store), never what a user works on.
    foreign = sorted(p.name for p in out.iterdir()
                     if p.name not in RUN_ENTRIES and not p.name.startswith("."))
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise RunFolderError(f"output_dir {out} holds {foreign[0]!r}{more}, which is not part of "
                             "a loratune run; --overwrite only replaces run folders: choose "
                             "another output_dir")


def prepare_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Create the run folder; with overwrite, an existing one is kept under a backup name.

    Leftovers of writes killed in an earlier start (temp checkpoints, adapters) go now."""
    check_run_dir(out, resume, overwrite)
    if overwrite and out.exists():
        backup = out.with_name(f"{out.name}.bak-{time.strftime('%Y%m%d-%H%M%S')}")
        out.rename(backup)
        print(f"previous run moved to {backup}")
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    remove_stale_temps(out / "checkpoints")


def resume_state(cfg: RunConfig, total_steps: int) -> dict:
    """What a checkpoint records about the run, for `check_resume_state` on resume."""
    return {"total_steps": total_steps, **{k: getattr(cfg.train, k) for k in RESUME_FIELDS}}


def check_resume_state(state: dict, cfg: RunConfig, path: Path) -> None:
    """Refuse a checkpoint whose batch size, accumulation or seed differ from this config."""
    wrong = [f"train.{k}: checkpoint {state[k]}, config {getattr(cfg.train, k)}"
             for k in RESUME_FIELDS if k in state and state[k] != getattr(cfg.train, k)]
    if wrong:
        raise RunFolderError(f"{path} was written by an incompatible configuration ("
                             f"{'; '.join(wrong)}); resume with the same values or start over "
                             "with --overwrite")


def write_config(out: Path, cfg: RunConfig) -> None:
    data = cfg.model_dump()
    if cfg.adapter.init_from:  # excluded from adapter files, but part of the run's config
        data["adapter"]["init_from"] = cfg.adapter.init_from
    text = yaml.safe_dump(data, sort_keys=False)
    write_atomic_file(out / "config.yaml", lambda tmp: tmp.write_text(text), overwrite=True)


def write_summary(out: Path, summary: dict) -> None:
    text = json.dumps(summary, indent=2) + "\n"
    write_atomic_file(out / DONE_FILE, lambda tmp: tmp.write_text(text), overwrite=True)
