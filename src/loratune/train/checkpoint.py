"""Checkpoints without pickle: adapter (PEFT format) + optimizer tensors (safetensors) + JSON.

Each checkpoint folder is written under a temp name and renamed, so a folder named
`step-NNNNNNNN` is always complete; an interrupted save leaves only a hidden temp folder. A
folder damaged later (a full disk, a bad copy) is found by `check_checkpoint` before resuming.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from loratune.adapters.inject import AdapterError
from loratune.adapters.io import copy_adapter_weights, save_adapter
from loratune.adapters.peft_format import read_adapter_weights
from loratune.files import remove_dir, write_atomic_dir
from loratune.readers import CorruptFileError, check_safetensors, read_json, read_safetensors

STEP_DIR = re.compile(r"^step-(\d{8})$")
HOOKS = "hooks."   # trainer_state.safetensors: the method hooks' tensors (TrainingHooks.state)


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{key}"] = value
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                        meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(ckpt_root: Path, step: int, model: nn.Module, optimizer, state: dict,
                    adapter: str = "default", keep: int | None = None, hooks=None) -> Path:
    """Write checkpoints/step-NNNNNNNN atomically, then prune to the newest `keep`. `hooks`
    (the method's TrainingHooks): their state (AdaLoRA's importance averages) goes along."""
    tensors, meta = optimizer_to_flat(optimizer)
    tensors.update(rng_tensors())
    if hooks is not None:
        tensors.update({f"{HOOKS}{k}": v.detach().cpu().contiguous()
                        for k, v in hooks.state().items()})
    out = ckpt_root / f"step-{step:08d}"

    def fill(tmp: Path) -> None:
        save_adapter(model, tmp / "adapter", adapter, compact=False)
        save_file(tensors, str(tmp / "trainer_state.safetensors"))
        (tmp / "trainer_state.json").write_text(
            json.dumps({"step": step, **state, "optimizer": meta}, indent=2))

    write_atomic_dir(out, fill, overwrite=True)
    if keep:
        for old in list_checkpoints(ckpt_root)[:-keep]:
            remove_dir(old)  # never a half-deleted folder under a resumable name
    return out


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.iterdir() if p.is_dir() and STEP_DIR.match(p.name))


def read_trainer_state(path: Path) -> dict:
    """trainer_state.json of checkpoint `path`; CorruptFileError names it when cut or garbled."""
    file = path / "trainer_state.json"
    meta = read_json(file)
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int) \
            or not isinstance(meta.get("optimizer"), dict):
        raise CorruptFileError(f"{file}: expected a JSON object with an integer 'step' and an "
                               "'optimizer' object; the file is damaged")
    return meta


def check_checkpoint(path: Path) -> None:
    """Raise CorruptFileError naming the first file of checkpoint `path` that cannot be read."""
    read_adapter_weights(path / "adapter")
    check_safetensors(path / "trainer_state.safetensors")
    read_trainer_state(path)


def _problem(path: Path) -> CorruptFileError | None:
    try:
        check_checkpoint(path)
    except (CorruptFileError, AdapterError) as err:  # AdapterError: a file is missing
        return CorruptFileError(str(err))
    return None


def choose_checkpoint(ckpts: list[Path], skip_corrupt: bool, log=print) -> Path:
    """The checkpoint to resume from: the newest one, if it is readable. A corrupt newest one
    is refused, naming the newest readable one, which `skip_corrupt` takes instead."""
    corrupt, good = [], None
    for path in reversed(ckpts):
        problem = _problem(path)
        if problem is None:
            good = path
            break
        corrupt.append((path, problem))
    if not corrupt:
        return good
    latest, problem = corrupt[0]
    if good is None:
        raise CorruptFileError(f"checkpoint {latest.name} is corrupt: {problem}; no earlier "
                               "checkpoint is readable: start over with --overwrite")
    if not skip_corrupt:
        raise CorruptFileError(f"checkpoint {latest.name} is corrupt: {problem}; the newest "
                               f"readable one is {good.name}: pass --resume-skip-corrupt to "
                               "resume from it")
    for path, problem in corrupt:
        log(f"skipping corrupt checkpoint {path.name}: {problem}")
    return good


def load_checkpoint(path: Path, model: nn.Module, optimizer, adapter: str = "default",
                    hooks=None) -> dict:
    """Restore adapter weights, optimizer state, RNG and, given `hooks`, their state; returns
    the saved trainer state."""
    weights = read_adapter_weights(path / "adapter")
    try:
        copy_adapter_weights(model, adapter, weights, path)
    except AdapterError as err:
        raise AdapterError(f"checkpoint does not fit this configuration: {err}") from None
    meta = read_trainer_state(path)
    tensors = read_safetensors(path / "trainer_state.safetensors")
    optimizer_from_flat(optimizer, {k: v for k, v in tensors.items() if k.startswith("state.")},
                        meta.pop("optimizer"))
    restore_rng(tensors)
    if hooks is not None:
        hooks.load_state({k[len(HOOKS):]: v for k, v in tensors.items() if k.startswith(HOOKS)},
                         path / "trainer_state.safetensors")
    return meta
