"""train/runtime.py: one process or one rank of a DDP/FSDP run, and the process group's lifetime."""

import socket

import pytest
import torch
import torch.distributed as dist

from loratune.train import distributed as lt_dist
from loratune.train.distributed import DistInfo
from loratune.train.runtime import (DataParallel, FullySharded, OneProcess, process_group,
                                    runtime_for)

CPU = torch.device("cpu")


def test_the_runtime_follows_the_world_size_and_mode():
    assert type(runtime_for(DistInfo(), "fsdp", CPU)) is OneProcess
    assert type(runtime_for(DistInfo(1, 2, 1), "ddp", CPU)) is DataParallel
    assert type(runtime_for(DistInfo(1, 2, 1), "fsdp", CPU)) is FullySharded


def test_what_each_runtime_runs_and_reports():
    one = runtime_for(DistInfo(), "ddp", CPU)
    batches = [{"i": i} for i in range(5)]
    assert one.is_main and one.micro_batches(4) == [0, 1, 2, 3]
    assert one.eval_batches(batches) == batches and one.sum([1.5, 2]) == [1.5, 2]
    assert one.notes(4) == [] and one.summary() == {}

    ddp = runtime_for(DistInfo(1, 2, 1), "ddp", CPU)
    assert not ddp.is_main and ddp.micro_batches(4) == [1, 3]
    assert ddp.eval_batches(batches) == batches[1::2]  # held-out batches split, then summed
    assert ddp.notes(4) == ["distributed: 2 processes, ddp, 2 micro-batch(es) per rank per step"]
    assert ddp.summary() == {"world_size": 2, "parallel": "ddp"}

    fsdp = runtime_for(DistInfo(1, 2, 1), "fsdp", CPU)
    assert fsdp.micro_batches(4) == [1, 3]
    # every rank runs every held-out forward (FSDP's all-gathers), so totals are not summed
    assert fsdp.eval_batches(batches) == batches and fsdp.sum_eval([3.0, 4]) == [3.0, 4]
    assert fsdp.summary() == {"world_size": 2, "parallel": "fsdp"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_rank_group(monkeypatch):
    """init_group as torchrun would run it, but for a world of one (no second process)."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))

    def init(device, info, timeout_s):
        dist.init_process_group("gloo", rank=0, world_size=1)
        return True

    monkeypatch.setattr(lt_dist, "init_group", init)


def test_the_group_is_left_when_training_raises(monkeypatch):
    _one_rank_group(monkeypatch)
    with pytest.raises(RuntimeError, match="failed on purpose"):
        with process_group(DistInfo(0, 2, 0), "ddp", CPU) as runtime:
            assert dist.is_initialized() and isinstance(runtime, DataParallel)
            raise RuntimeError("failed on purpose")
    assert not dist.is_initialized()


def test_a_group_the_caller_made_stays_open(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        with process_group(DistInfo(0, 2, 0), "ddp", CPU):
            pass
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
