"""One process or several: what the training recipe asks instead of branching on the world size.

`OneProcess` runs every micro-batch, writes every file and needs no collective. Under torchrun
`DataParallel` (DDP) or `FullySharded` (FSDP2) answer the same questions for one rank of the
run: which micro-batches are mine, how a step's numbers are summed, how the model is wrapped and
saved. `process_group` joins torchrun's process group on enter, leaves it on exit (also when
training raises) and hands the recipe the runtime for that group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from loratune.adapters.registry import method_record
from loratune.config import RunConfig
from loratune.train import distributed as lt_dist
from loratune.train.distributed import DistInfo
from loratune.train.loss import causal_lm_loss
from loratune.train.run_folder import RunFolderError

# batch -> (summed token loss, label count)
Forward = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, int]]
# (model, batch, chunk) -> the same: causal_lm_loss, or a preference objective's loss
LossFn = Callable[..., tuple[torch.Tensor, int]]


@dataclass
class OneProcess:
    """A run on one process: every micro-batch is mine, every sum is already complete."""

    device: torch.device
    info: DistInfo = DistInfo()
    mode: str = "ddp"

    @property
    def is_main(self) -> bool:
        """The process that prints, logs and writes files."""
        return self.info.is_main

    def barrier(self) -> None:
        """Wait until every process got here."""

    def micro_batches(self, grad_accum: int) -> list[int]:
        """The indices of a step's micro-batches this process runs."""
        return lt_dist.local_micro_indices(grad_accum, self.info)

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the processes."""
        return list(values)

    def eval_batches(self, batches: list[dict]) -> list[dict]:
        """The held-out batches this process runs."""
        return batches

    def sum_eval(self, values: list[float]) -> list[float]:
        """Held-out totals of `eval_batches` summed to the whole set's."""
        return self.sum(values)

    def agree_on_checkpoint(self, chosen: Path | None, root: Path) -> Path | None:
        """The checkpoint (in folder `root`) every process resumes from: the main one's choice."""
        return chosen

    def wrap_model(self, model: nn.Module, cfg: RunConfig, loss_fn: LossFn | None = None
                   ) -> Forward:
        """The training forward: the summed loss of a batch and what it is summed over
        (`loss_fn(model, batch, chunk)`: a preference objective's loss over pairs; None: the
        token loss over labels, causal_lm_loss)."""
        return partial(loss_fn or causal_lm_loss, model, chunk=cfg.train.loss_chunk)

    def grad_sync(self, last: bool) -> AbstractContextManager:
        """A context for one micro-batch's backward; `last`: the step's last one here."""
        return nullcontext()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)

    def optimizer_to_save(self, optimizer: torch.optim.Optimizer):
        """What checkpoint.py reads the optimizer state from (a collective where sharded)."""
        return optimizer

    def gathered(self) -> AbstractContextManager:
        """A context in which the adapter's parameters are whole on every process, to save."""
        return nullcontext()

    def seed_training(self, seed: int, start_step: int) -> None:
        """Seed the training steps' random draws (dropout).

        One process keeps the stream where setup left it (or where the checkpoint saved it),
        so a resumed run draws what the uninterrupted one would have drawn."""

    def notes(self, grad_accum: int) -> list[str]:
        """Sentences for the log about how the run is split."""
        return []

    def summary(self) -> dict:
        """Entries for run_summary.json."""
        return {}


@dataclass
class DataParallel(OneProcess):
    """One rank of a DDP run: a share of each step's micro-batches, gradients summed."""

    wrapper: nn.Module | None = field(default=None, init=False)

    def barrier(self) -> None:
        dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        # float64: label counts and summed losses stay exact; NCCL needs them on the GPU
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def eval_batches(self, batches: list[dict]) -> list[dict]:
        return batches[self.info.rank::self.info.world_size]

    def agree_on_checkpoint(self, chosen: Path | None, root: Path) -> Path | None:
        # Rank 0's choice: the others may see other folders (output_dir not shared, or a copy
        # still arriving), and every rank must load the same step.
        box = [chosen.name if chosen else None]
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            return None
        path = root / box[0]
        if not path.is_dir():
            raise RunFolderError(f"rank {self.info.rank}: {path} not found; resuming on several "
                                 "machines needs output_dir on a shared filesystem")
        return path

    def wrap_model(self, model: nn.Module, cfg: RunConfig, loss_fn: LossFn | None = None
                   ) -> Forward:
        unused = method_record(cfg.adapter.method).training.unused_parameters
        self.wrapper = lt_dist.wrap_ddp(model, cfg.train.loss_chunk, self.device,
                                        find_unused=unused, loss_fn=loss_fn)
        return self.wrapper

    def grad_sync(self, last: bool) -> AbstractContextManager:
        # The all-reduce runs in the step's last backward only; the others accumulate locally.
        return nullcontext() if last else self.wrapper.no_sync()

    def seed_training(self, seed: int, start_step: int) -> None:
        # Dropout draws differ per rank (ranks see different rows); equal within a rank on resume.
        torch.manual_seed(seed + 7919 * self.info.rank + start_step)

    def notes(self, grad_accum: int) -> list[str]:
        ws = self.info.world_size
        return [f"distributed: {ws} processes, {self.mode}, {grad_accum // ws} micro-batch(es) "
                "per rank per step"]

    def summary(self) -> dict:
        return {"world_size": self.info.world_size, "parallel": self.mode}


@dataclass
class FullySharded(DataParallel):
    """One rank of an FSDP2 run: like DDP, but parameters and optimizer states are sharded."""

    def eval_batches(self, batches: list[dict]) -> list[dict]:
        # FSDP's all-gathers are collectives: every rank must run the same forwards.
        return batches

    def sum_eval(self, values: list[float]) -> list[float]:
        return list(values)  # every rank ran every held-out batch

    def wrap_model(self, model: nn.Module, cfg: RunConfig, loss_fn: LossFn | None = None
                   ) -> Forward:
        self.wrapper = lt_dist.wrap_fsdp(model, cfg.train.loss_chunk, self.device,
                                         self.info.world_size, loss_fn=loss_fn)
        return self.wrapper

    def grad_sync(self, last: bool) -> AbstractContextManager:
        self.wrapper.set_requires_gradient_sync(last)
        return nullcontext()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        lt_dist.FullStateOptimizer(optimizer).load_state_dict(state)  # re-shards each state

    def optimizer_to_save(self, optimizer: torch.optim.Optimizer):
        # Gathered to full tensors, so the checkpoint resumes on any world size.
        return _Snapshot(lt_dist.FullStateOptimizer(optimizer).state_dict())

    def gathered(self) -> AbstractContextManager:
        return lt_dist.GatheredAdapter(self.wrapper)

    def summary(self) -> dict:
        if self.wrapper is None:  # not wrapped yet: nothing is sharded
            return super().summary()
        held, whole = lt_dist.local_4bit_bytes(self.wrapper)
        extra = {"base_4bit_bytes": whole, "base_4bit_bytes_rank0": held} if whole else {}
        return {**super().summary(), **extra}


class _Snapshot:
    """An optimizer state taken once, read by save_checkpoint like an optimizer's."""

    def __init__(self, sd: dict):
        self.sd = sd

    def state_dict(self) -> dict:
        return self.sd


def runtime_for(info: DistInfo, mode: str, device: torch.device) -> OneProcess:
    """The runtime of this process: one process, or one rank of a DDP/FSDP run."""
    if not info.enabled:
        return OneProcess(device, info, mode)
    return (FullySharded if mode == "fsdp" else DataParallel)(device, info, mode)


@contextmanager
def process_group(info: DistInfo, mode: str, device: torch.device,
                  timeout_s: float = lt_dist.DEFAULT_TIMEOUT_S) -> Iterator[OneProcess]:
    """Join torchrun's process group for the body (if nobody has) and leave it after, also on
    error; yields this process's runtime. A group someone else created stays open."""
    created = lt_dist.init_group(device, info, timeout_s)
    try:
        yield runtime_for(info, mode, device)
    finally:
        if created:
            dist.destroy_process_group()
