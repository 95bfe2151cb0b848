"""Training on several processes: DDP or FSDP2 over adapter gradients, and the torchrun launcher.

torchrun starts one process per device and sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT; `DistInfo.from_env()` reads them and `init_group` joins the process group (gloo
on CPU, NCCL on CUDA). One optimizer step is always `train.grad_accum` micro-batches of
`train.batch_size` rows; with W processes, rank r runs the micro-batches k with k % W == r, so
the data order, the step count and the checkpoints do not depend on W. The recipe does not call
these pieces itself: it asks train/runtime.py's runtime for this rank.

Gradients are SUMMED across ranks (not averaged as DDP does by default): the loop already
divides each micro-batch's loss by the label count of the whole step, so the sum over ranks is
exactly the single-process gradient of the same step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from loratune.adapters.registry import method_record
from loratune.quant.linear4bit import Linear4bit
from loratune.train.loss import causal_lm_loss

PARALLEL_MODES = ("ddp", "fsdp")
DEFAULT_TIMEOUT_S = 600


class DistributedError(ValueError):
    """A distributed setting that cannot work; the message names the field and the numbers."""


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "DistInfo":
        """What torchrun set for this process (one process when nothing is set)."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(),
                       int(os.environ.get("LOCAL_RANK", 0)))
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))


def check_objective(objective: str, parallel: str, world_size: int) -> None:
    """GRPO rolls out on each rank's whole model: DDP only (FSDP shards the weights the rollout
    reads outside FSDP's forward). Refused before torchrun starts any worker."""
    if objective == "grpo" and world_size > 1 and parallel != "ddp":
        raise DistributedError(
            f"train.parallel {parallel} with train.objective grpo on {world_size} processes: "
            "rollouts run the whole model on every rank; use train.parallel: ddp")


def check_world_size(grad_accum: int, batch_size: int, world_size: int) -> None:
    """Each rank must run the same number of micro-batches per optimizer step."""
    if grad_accum % world_size == 0:
        return
    good = [w for w in range(1, grad_accum + 1) if grad_accum % w == 0]
    up = world_size * -(-grad_accum // world_size)
    raise DistributedError(
        f"world size {world_size} does not divide train.grad_accum={grad_accum}: one optimizer "
        f"step is {grad_accum} micro-batches of train.batch_size={batch_size} rows "
        f"({grad_accum * batch_size} rows), split evenly over the processes. Set "
        f"train.grad_accum to a multiple of {world_size} (e.g. {up}), or launch a number of "
        f"processes that divides {grad_accum}: {', '.join(map(str, good))}")


def local_micro_indices(grad_accum: int, info: DistInfo) -> list[int]:
    """The micro-batches of a step this rank runs (round-robin over ranks)."""
    return [k for k in range(grad_accum) if k % info.world_size == info.rank]


def check_parallel_options(train_cfg, method: str, info: DistInfo) -> str:
    """Validate train.parallel / train.deepspeed before the slow setup; returns the mode."""
    deepspeed = train_cfg.deepspeed
    if deepspeed:
        check_deepspeed(deepspeed)
    mode = train_cfg.parallel
    if mode not in PARALLEL_MODES:
        raise DistributedError(f"train.parallel '{mode}': expected one of "
                               f"{', '.join(PARALLEL_MODES)}")
    if not info.enabled:
        return mode
    check_world_size(train_cfg.grad_accum, train_cfg.batch_size, info.world_size)
    why = method_record(method).training.why_single_process
    if why is not None:
        raise DistributedError(f"adapter.method: {method} is not supported on several processes "
                               f"({why}); train it on one process or use lora/dora")
    return mode


def check_deepspeed(config_path: str) -> dict:
    """Read a ZeRO-2/3 JSON config; refuse clearly where DeepSpeed cannot run (CPU, no package)."""
    path = Path(config_path)
    if not path.is_file():
        raise DistributedError(f"train.deepspeed: {path} is not a file (expected a DeepSpeed "
                               "JSON config)")
    try:
        ds = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DistributedError(f"train.deepspeed: {path} is not valid JSON: {err}") from None
    stage = (ds.get("zero_optimization") or {}).get("stage") if isinstance(ds, dict) else None
    if stage not in (2, 3):
        raise DistributedError(f"train.deepspeed: {path} has zero_optimization.stage={stage!r}; "
                               "expected 2 or 3")
    if not torch.cuda.is_available():
        raise DistributedError(
            f"train.deepspeed ({path}, ZeRO-{stage}) needs CUDA GPUs and this machine has none; "
            "on CPU use train.parallel: ddp (replicates the base) or train.parallel: fsdp "
            "(shards it) with torchrun, and remove train.deepspeed")
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise DistributedError(f"train.deepspeed ({path}) needs the deepspeed package: "
                               "pip install deepspeed (or use train.parallel: fsdp)")
    raise DistributedError(f"train.deepspeed ({path}): the DeepSpeed engine is not wired into "
                           "loratune's loop yet; use train.parallel: fsdp for ZeRO-3-like "
                           "sharding or ddp for ZeRO-free data parallelism")


def device_for(requested: str, info: DistInfo) -> str:
    """Under torchrun on CUDA each process drives the GPU of its LOCAL_RANK."""
    if info.enabled and requested.startswith("cuda"):
        return f"cuda:{info.local_rank}"
    return requested


def init_group(device: torch.device, info: DistInfo,
               timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Join the process group if torchrun started us and nobody has; True if we created it.

    The timeout bounds how long a collective waits for a rank that died or hangs; torchrun's
    agent usually tears the group down sooner, when it sees the failed process exit."""
    if not info.enabled or dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timedelta(seconds=timeout_s), device_id=device)
    else:
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    return True


class LossModule(nn.Module):
    """forward(batch) -> (summed loss, count); the unit DDP/FSDP wrap. `loss_fn(model, batch,
    chunk)`: a preference objective's loss; None: causal_lm_loss (token loss, label count)."""

    def __init__(self, model: nn.Module, chunk: int, loss_fn=None):
        super().__init__()
        self.model = model
        self.chunk = chunk
        self.loss_fn = loss_fn

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        return (self.loss_fn or causal_lm_loss)(self.model, batch, self.chunk)


def _sum_allreduce(group, bucket):
    """DDP comm hook: all-reduce SUM (DDP's default divides by the world size)."""
    fut = dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


@dataclass(frozen=True)
class RankShare:
    """What a GRPO step needs from the other ranks; on one process every call is the identity.

    Each rank holds as many rollout rows (whole groups), so row tensors gather rank by rank.
    Gradients are summed, as wrap_ddp's hook does: the step's normalisers are global."""

    info: DistInfo = DistInfo()
    device: torch.device = torch.device("cpu")

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's rows of `t`, rank 0's first (NCCL needs them on the device)."""
        if not self.info.enabled:
            return t
        local = t.to(self.device).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.info.world_size)]
        dist.all_gather(parts, local)
        return torch.cat(parts).to(t.device)

    def mine(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's block of a tensor `gather` built."""
        n = t.size(0) // self.info.world_size
        return t[self.info.rank * n:(self.info.rank + 1) * n]

    def sum(self, values: list[float]) -> list[float]:
        if not self.info.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def sum_gradients(self, params: list[torch.Tensor]) -> None:
        """One all-reduce of every gradient (a rank with no rows this step adds zeros)."""
        if not self.info.enabled or not params:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat)
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad.copy_(g.view_as(p))

    def broadcast(self, params: list[torch.Tensor]) -> None:
        """Rank 0's values on every rank (the adapter every rank starts from)."""
        if self.info.enabled:
            for p in params:
                dist.broadcast(p.data, src=0)


def wrap_ddp(model: nn.Module, chunk: int, device: torch.device,
             find_unused: bool = False, loss_fn=None) -> nn.Module:
    """DDP over the trainable (adapter) parameters only.

    Frozen base weights and buffers are left out of DDP's start-up broadcast: every rank loaded
    them from the same file, and for a 7B base the broadcast would move gigabytes. The adapter
    parameters are broadcast from rank 0, so every rank starts from the same adapter."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    module = LossModule(model, chunk, loss_fn)
    ignore = [n for n, p in module.named_parameters() if not p.requires_grad]
    ignore += [n for n, _ in module.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(module, ignore)
    ddp = DDP(module, device_ids=[device.index] if device.type == "cuda" else None,
              forward_sync_buffers=False, find_unused_parameters=find_unused)
    ddp.register_comm_hook(None, _sum_allreduce)
    return ddp


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise DistributedError(f"train.parallel: fsdp needs a decoder with .layers; "
                               f"{type(model).__name__} has none")
    return list(layers)


def wrap_fsdp(model: nn.Module, chunk: int, device: torch.device, world_size: int,
              loss_fn=None) -> nn.Module:
    """FSDP2: each decoder layer is one shard unit, the rest (embeddings, norm, head) the root.

    fully_shard shards Parameters only: frozen fp32/bf16 base weights are sharded, and so are
    4-bit ones once `Linear4bit.shardable()` holds their codes and scales as frozen uint8/fp32
    Parameters (a 4-bit base too large for one device fits on several)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    for m in model.modules():
        if isinstance(m, Linear4bit):
            m.shardable()
    mesh = init_device_mesh(device.type, (world_size,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    module = LossModule(model, chunk, loss_fn)
    fully_shard(module, mesh=mesh)
    for m in module.modules():
        if hasattr(m, "set_gradient_divide_factor"):
            m.set_gradient_divide_factor(1.0)  # sum, like the DDP hook
            m.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
    return module


def local_4bit_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of 4-bit base storage this process holds, bytes of the whole 4-bit base)."""
    held = whole = 0
    for m in model.modules():
        if isinstance(m, Linear4bit):
            for name in ("packed", "absmax", "offset", "absmax2"):
                t = getattr(m, name)
                if t is None:
                    continue
                local = t.to_local() if hasattr(t, "to_local") else t
                held += local.numel() * local.element_size()
                whole += t.numel() * t.element_size()
    return held, whole


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a possibly sharded DTensor (a collective: every rank must call)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class FullStateOptimizer:
    """What checkpoint.py reads from an FSDP optimizer: states gathered to full tensors.

    Saved checkpoints then look exactly like single-process ones, so a run can resume with any
    world size (or on one process). Loading re-shards each state like its parameter."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def state_dict(self) -> dict:
        sd = self.optimizer.state_dict()
        sd["state"] = {i: {k: full_tensor(v) if torch.is_tensor(v) else v for k, v in s.items()}
                       for i, s in sd["state"].items()}
        return sd

    def load_state_dict(self, sd: dict) -> None:
        from torch.distributed.tensor import distribute_tensor

        params = self._params()
        state = {}
        for i, s in sd["state"].items():
            p = params[int(i)]
            state[i] = {k: (distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
                            if hasattr(p, "device_mesh") and torch.is_tensor(v) and v.dim()
                            else v) for k, v in s.items()}
        self.optimizer.load_state_dict({**sd, "state": state})


class GatheredAdapter:
    """`with GatheredAdapter(module):` trainable parameters are whole, plain tensors on every rank.

    Used to save adapters under FSDP2: each sharded trainable parameter is all-gathered and
    swapped in for the duration, then the shard is put back (the frozen base stays sharded).
    FSDP2's unsharded parameters live in its communication buffers, which safetensors refuses:
    the root stays unsharded after a forward (eval), so every unit is resharded first."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.swapped: list[tuple[nn.Module, str, nn.Parameter]] = []

    def __enter__(self):
        for mod in self.module.modules():
            if hasattr(mod, "reshard") and hasattr(mod, "unshard"):
                mod.reshard()  # local: drops the gathered copy, registers the shards again
        for mod in self.module.modules():  # the same order on every rank: collectives match
            for name, p in list(mod._parameters.items()):
                if p is not None and p.requires_grad and hasattr(p, "full_tensor"):
                    mod._parameters[name] = nn.Parameter(p.full_tensor().detach())
                    self.swapped.append((mod, name, p))

    def __exit__(self, *exc):
        for mod, name, p in self.swapped:
            mod._parameters[name] = p
        self.swapped.clear()


def torchrun_command(nproc: int, target: list[str], nnodes: int = 1,
                     rdzv_endpoint: str | None = None) -> list[str]:
    """The torchrun command line for `target` (['-m', 'loratune', 'train', ...] or a script).

    One machine: --standalone (a local rendezvous on a free port). Several machines: the same
    command on each with --nnodes and a shared c10d rendezvous endpoint host:port."""
    if nproc < 1:
        raise DistributedError(f"--nproc {nproc}: expected at least 1 process")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    if nnodes > 1:
        if not rdzv_endpoint:
            raise DistributedError("several nodes need a rendezvous endpoint host:port")
        cmd += ["--nnodes", str(nnodes), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", rdzv_endpoint]
    else:
        cmd.append("--standalone")
    return cmd + list(target)


def launch(nproc: int, train_argv: list[str]) -> int:
    """`loratune train --nproc N ...`: rerun the same command under torchrun; its exit code."""
    cmd = torchrun_command(nproc, ["-m", "loratune", "train", *train_argv])
    return subprocess.call(cmd)
