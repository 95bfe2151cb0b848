"""The LoRA SFT recipe: setup → train → save, in that order, on one process or under torchrun.

`train(cfg)` reads data, loads the base model, adds the adapter, runs the optimizer loop with
gradient accumulation, evaluates held-out loss, writes metrics/checkpoints, and saves the
final adapter in PEFT format under `<output_dir>/adapter`. Started by torchrun (WORLD_SIZE > 1)
each process runs its share of every step's micro-batches (train/distributed.py); only rank 0
prints and writes files.
"""

from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import yaml
from torch import nn

from loratune import data as lt_data
from loratune.adapters import add_adapter, method_record, save_adapter, trainable_report
from loratune.config import RunConfig
from loratune.files import protected_reason, remove_stale_temps, write_atomic_file
from loratune.models import load_model
from loratune.train import distributed as lt_dist
from loratune.train.checkpoint import (choose_checkpoint, list_checkpoints, load_checkpoint,
                                       save_checkpoint)
from loratune.train.distributed import DistInfo
from loratune.train.host_memory import use_mmap_for_large_blocks
from loratune.train.loss import causal_lm_loss
from loratune.train.method_hooks import method_hooks
from loratune.train.metrics import MetricsLog, plot_loss
from loratune.train.offload import activation_offload, offload_notes
from loratune.train.optim import build_optimizer, set_lr
from loratune.train.schedule import lr_factor

DONE_FILE = "run_summary.json"


class RunFolderError(RuntimeError):
    pass


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    steps: int
    final_loss: float
    eval_loss: float | None
    seconds: float
    tokens: int
    label_tokens: int
    history: list[dict] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


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
    if any(p.name != "config.yaml" for p in out.iterdir()):
        raise RunFolderError(f"{out} is not empty; pass --overwrite or choose another output_dir")


# What train and demo write into a run folder. --overwrite moves the folder away, so one
# holding anything else (or cwd, or home) is someone's own files and is refused.
RUN_ENTRIES = {"config.yaml", "metrics.jsonl", "checkpoints", "adapter", DONE_FILE, "loss.png",
               "demo_report.json"}


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


def resolve_data_paths(cfg: RunConfig) -> tuple[str, str | None]:
    from loratune.demo import demo_heldout_path, demo_train_path

    train = str(demo_train_path()) if cfg.data.train == "demo" else cfg.data.train
    held = cfg.data.eval
    if held == "demo" or (held is None and cfg.data.train == "demo"):
        held = str(demo_heldout_path())
    return train, held


def build_data(cfg: RunConfig, tokenizer):
    train_path, eval_path = resolve_data_paths(cfg)
    train_ex, stats = lt_data.build_examples(train_path, tokenizer, cfg.data)
    eval_ex = []
    if eval_path:
        eval_ex, _ = lt_data.build_examples(eval_path, tokenizer, cfg.data)
    elif cfg.data.eval_fraction:
        train_ex, eval_ex = lt_data.split_heldout(train_ex, cfg.data.eval_fraction, cfg.train.seed)
    packing = cfg.data.packing
    record = method_record(cfg.adapter.method)
    if not record.packing_ok:
        if packing is True:
            raise ValueError(f"data.packing: true does not work with adapter.method: "
                             f"{cfg.adapter.method} ({record.why_no_packing}); use auto/false")
        packing = False
    if packing == "auto":
        packing = lt_data.should_pack(train_ex, cfg.data.max_length, cfg.train.batch_size)
    return train_ex, eval_ex, stats, bool(packing)


def epoch_batches(cfg: RunConfig, examples, packing: bool, pad_id: int, epoch: int) -> list[dict]:
    return lt_data.batches(examples, cfg.train.batch_size, cfg.data.max_length, packing,
                           pad_id=pad_id, seed=cfg.train.seed, epoch=epoch)


def check_context(cfg: RunConfig, model: nn.Module) -> None:
    """Virtual tokens take context positions: they and the longest row must fit the model."""
    n = getattr(cfg.adapter, "num_virtual_tokens", 0)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if n and limit and n + cfg.data.max_length > limit:
        raise ValueError(f"adapter.num_virtual_tokens={n} plus data.max_length="
                         f"{cfg.data.max_length} exceeds the model's context of {limit} positions; "
                         f"use at most {max(limit - cfg.data.max_length, 0)} virtual tokens or a "
                         "shorter max_length")


def low_host_memory(cfg: RunConfig) -> bool:
    if cfg.train.host_memory == "auto":
        return cfg.model.quantization is not None
    return cfg.train.host_memory == "low"


def set_checkpointing(model: nn.Module, on: bool) -> None:
    """Recompute each decoder layer in backward instead of keeping its activations."""
    # transformers 5 renamed the API; older releases only have the gradient_* names.
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate_loss(model: nn.Module, forward, batches: list[dict], device, info: DistInfo,
                  mode: str) -> float | None:
    """Held-out loss per label token; DDP ranks split the batches and sum, FSDP ranks all run
    all of them (its all-gathers are collectives: every rank must run the same forwards)."""
    mine = batches[info.rank::info.world_size] if info.enabled and mode != "fsdp" else batches
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in mine:
        loss, n = forward(to_device(batch, device))
        total += float(loss)
        count += n
    model.train(was_training)
    if mode != "fsdp":
        total, count = lt_dist.sum_across([total, count], info, device)
    return total / count if count else None


def _progress(total: int, start: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, desc="train", unit="step",
                mininterval=2.0,
                dynamic_ncols=True)


def train(cfg: RunConfig, resume: bool = False, overwrite: bool = False, model=None,
          tokenizer=None, quiet: bool = False, skip_corrupt: bool = False) -> TrainResult:
    """Train an adapter as `cfg` says; under torchrun, one data-parallel rank of the run.

    `skip_corrupt`: on resume, pass over corrupt newest checkpoints to the newest readable one
    (without it a corrupt newest checkpoint is an error that names both)."""
    info = DistInfo.from_env()
    mode = lt_dist.check_parallel_options(cfg.train, cfg.adapter.method, info)
    owns = {"group": False}
    try:
        return _train(cfg, resume, overwrite, model, tokenizer, quiet, info, mode, owns,
                      skip_corrupt)
    finally:
        if owns["group"]:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(cfg: RunConfig, resume: bool, overwrite: bool, model, tokenizer, quiet: bool,
           info: DistInfo, mode: str, owns: dict, skip_corrupt: bool = False) -> TrainResult:
    out = Path(cfg.output_dir)
    check_run_dir(out, resume, overwrite)  # fail before the slow setup, touch nothing yet
    seed_everything(cfg.train.seed)
    if low_host_memory(cfg):
        use_mmap_for_large_blocks()
    if model is None:
        model_cfg = cfg.model
        if info.enabled:
            model_cfg = cfg.model.model_copy(
                update={"device": lt_dist.device_for(cfg.model.device, info)})
        model, tokenizer = load_model(model_cfg)
    device = next(model.parameters()).device
    owns["group"] = lt_dist.init_group(
        device, info, cfg.train.dist_timeout)
    quiet = quiet or not info.is_main  # rank 0 alone prints, logs and writes files
    train_ex, eval_ex, stats, packing = build_data(cfg, tokenizer)
    log = print if not quiet else (lambda *a, **k: None)
    log(f"data: {stats.n_examples} examples ({stats.format}), {stats.n_truncated} truncated, "
        f"{stats.dropped()}; packing={'on' if packing else 'off'}; "
        f"held-out: {len(eval_ex)}")
    if not train_ex:
        raise ValueError(f"no training examples left in {cfg.data.train}")

    check_context(cfg, model)
    torch.manual_seed(cfg.train.seed)
    add_adapter(model, cfg.adapter, "default", tokenizer=tokenizer)
    log(trainable_report(model)[2])
    # Only now, with data, model and adapter known good, is the run folder created.
    if info.is_main:
        prepare_run_dir(out, resume, overwrite)
    lt_dist.barrier(info)  # the others look for checkpoints only once the folder is settled
    if info.enabled:
        log(f"distributed: {info.world_size} processes, {mode}, "
            f"{cfg.train.grad_accum // info.world_size} micro-batch(es) per rank per step")
    if cfg.train.gradient_checkpointing:
        set_checkpointing(model, True)
    pad_id = tokenizer.pad_token_id

    n_batches = len(epoch_batches(cfg, train_ex, packing, pad_id, 0))
    steps_per_epoch = max(1, n_batches // cfg.train.grad_accum)
    total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    warmup = int(cfg.train.warmup_ratio * total_steps)
    eval_batches = epoch_batches(cfg, eval_ex, packing, pad_id, 0) if eval_ex else []
    hooks = method_hooks(model, cfg.adapter, "default", total_steps)

    metrics = MetricsLog(out / "metrics.jsonl", enabled=info.is_main)
    start_step = 0
    ckpts = list_checkpoints(out / "checkpoints")
    if resume and ckpts:  # newer than the chosen one: corrupt, skipped on request
        ckpts = ckpts[: ckpts.index(choose_checkpoint(ckpts, skip_corrupt, log)) + 1]
    if resume and ckpts and getattr(cfg.adapter, "prefix_projection", False):
        raise RunFolderError("resume is not supported for prefix tuning with prefix_projection "
                             "(checkpoints hold the computed prefixes, not the MLP); start over "
                             "with --overwrite or train without prefix_projection")
    if info.enabled:
        wrapper, optimizer, start_step = _distributed_setup(
            cfg, model, device, info, mode, out, resume, ckpts, log)
        forward = wrapper
    else:
        wrapper = None
        optimizer = build_optimizer(model, cfg.train)
        forward = partial(causal_lm_loss, model, chunk=cfg.train.loss_chunk)
        if resume and ckpts:
            state = load_checkpoint(ckpts[-1], model, optimizer)
            check_resume_state(state, cfg, ckpts[-1])
            start_step = state["step"]
            log(f"resumed from {ckpts[-1]} at step {start_step}")
    if info.is_main:  # only now: a refused resume leaves the run's config.yaml as it was
        _write_config(out, cfg)
    for note in offload_notes(cfg.train, device):
        log(note)
    if resume and start_step and info.is_main:
        metrics.truncate_after(start_step)
    elif not resume and info.is_main:
        metrics.path.unlink(missing_ok=True)
    saver = _Saver(cfg, model, optimizer, wrapper, mode, info, out)

    model.train()
    history: list[dict] = []
    tokens_seen = label_seen = 0
    t_start = time.perf_counter()
    loss_value = float("nan")
    eval_loss = None
    bar = _progress(total_steps, start_step, not quiet)
    epoch_cache: dict[int, list[dict]] = {}
    local = lt_dist.local_micro_indices(cfg.train.grad_accum, info)
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        lr = set_lr(optimizer, lr_factor(step, total_steps, warmup, cfg.train.schedule))
        micro = []
        for k in range(cfg.train.grad_accum):
            index = step * cfg.train.grad_accum + k
            # The data is one stream of epochs: a step may span the end of one and the next.
            epoch, pos = divmod(index, n_batches)
            if epoch not in epoch_cache:
                epoch_cache.clear()
                epoch_cache[epoch] = epoch_batches(cfg, train_ex, packing, pad_id, epoch)
            micro.append(epoch_cache[epoch][pos])
        # Every rank builds the whole step, so the label count is the global one.
        n_labels = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        step_tokens = sum(int(b["input_ids"].numel()) for b in micro)
        step_loss = extra_loss = 0.0
        for i, k in enumerate(local):
            last = i == len(local) - 1  # the all-reduce runs in the last backward only
            sync = lt_dist.set_grad_sync(wrapper, last) if wrapper is not None else nullcontext()
            with sync:
                batch = to_device(micro[k], device)
                with activation_offload(cfg.train.offload_activations, device):
                    loss_sum, _ = forward(batch)
                # Normalize by the step's label count: the token-level mean over all micro-batches.
                loss = loss_sum / max(n_labels, 1)
                extra = hooks.micro_loss()
                if extra is not None:
                    loss = loss + extra / len(micro)
                    extra_loss += float(extra.detach()) / len(micro)
                loss.backward()
            step_loss += float(loss_sum.detach())
        step_loss, extra_loss = lt_dist.sum_across([step_loss, extra_loss], info, device)
        extra = hooks.step_loss()
        if extra is not None:
            extra.backward()
            extra_loss += float(extra.detach())
        grad_norm = None
        if cfg.train.max_grad_norm:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
            grad_norm = float(lt_dist.full_tensor(norm))
        optimizer.step()
        hooks.after_step(step + 1)
        optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        tokens_seen += step_tokens
        label_seen += n_labels
        loss_value = step_loss / max(n_labels, 1)
        record = {"step": step + 1, "loss": round(loss_value, 6), "lr": lr,
                  "grad_norm": grad_norm, "tokens": step_tokens, "label_tokens": n_labels,
                  "seconds": round(dt, 4), "tokens_per_s": round(step_tokens / dt, 1)}
        if extra_loss:
            record["extra_loss"] = round(extra_loss, 6)
        if eval_batches and cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0:
            eval_loss = evaluate_loss(model, forward, eval_batches, device, info, mode)
            record["eval_loss"] = round(eval_loss, 6)
        if (step + 1) % cfg.train.log_every == 0 or "eval_loss" in record:
            metrics.write(record)
        history.append(record)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{step_tokens / dt:.0f}")
        bar.update(1)
        if cfg.train.save_every and (step + 1) % cfg.train.save_every == 0 and step + 1 < total_steps:
            saver.checkpoint(step + 1, total_steps)
    bar.close()
    seconds = time.perf_counter() - t_start

    if eval_batches:
        eval_loss = evaluate_loss(model, forward, eval_batches, device, info, mode)
        metrics.write({"step": total_steps, "eval_loss": round(eval_loss, 6)})
    if cfg.train.gradient_checkpointing:
        set_checkpointing(model, False)
    model.eval()
    adapter_dir = saver.final_adapter()
    if not info.is_main:
        lt_dist.barrier(info)  # wait until rank 0 has written everything
        return TrainResult(out, adapter_dir, total_steps, loss_value, eval_loss, seconds,
                           tokens_seen, label_seen, history)
    plot_loss(out / "metrics.jsonl", out / "loss.png")
    n_trainable, n_all, report = trainable_report(model)
    summary = {"steps": total_steps, "final_loss": loss_value, "eval_loss": eval_loss,
               "train_seconds": round(seconds, 2), "tokens": tokens_seen,
               "label_tokens": label_seen, "packing": packing,
               "trainable": report, "trainable_params": n_trainable, "all_params": n_all,
               "method": cfg.adapter.method,
               "seconds_per_step": round(seconds / max(total_steps - start_step, 1), 4),
               "peak_rss_mib": peak_rss_mib(), **hooks.summary()}
    if info.enabled:
        summary["world_size"] = info.world_size
        summary["parallel"] = mode
    _write_json_atomic(out / DONE_FILE, summary)
    lt_dist.barrier(info)
    return TrainResult(out, adapter_dir, total_steps, loss_value, eval_loss, seconds,
                       tokens_seen, label_seen, history)


# What decides the data order and the meaning of a step: a checkpoint written under other values
# would resume on different batches. The world size is free to change.
RESUME_FIELDS = ("batch_size", "grad_accum", "seed")


def resume_state(cfg: RunConfig, total_steps: int) -> dict:
    return {"total_steps": total_steps, **{k: getattr(cfg.train, k) for k in RESUME_FIELDS}}


def check_resume_state(state: dict, cfg: RunConfig, path: Path) -> None:
    """Refuse a checkpoint whose batch size, accumulation or seed differ from this config."""
    wrong = [f"train.{k}: checkpoint {state[k]}, config {getattr(cfg.train, k)}"
             for k in RESUME_FIELDS if k in state and state[k] != getattr(cfg.train, k)]
    if wrong:
        raise RunFolderError(f"{path} was written by an incompatible configuration ("
                             f"{'; '.join(wrong)}); resume with the same values or start over "
                             "with --overwrite")


class _DeferredOptimizerState:
    """Catches the optimizer state load_checkpoint restores, to apply once the optimizer exists."""

    def __init__(self):
        self.state: dict | None = None

    def load_state_dict(self, sd: dict) -> None:
        self.state = sd


def _distributed_setup(cfg: RunConfig, model: nn.Module, device, info: DistInfo, mode: str,
                       out: Path, resume: bool, ckpts: list[Path], log):
    """Resume into the plain model, wrap it (DDP or FSDP), then build the optimizer."""
    start_step, deferred = 0, _DeferredOptimizerState()
    chosen = lt_dist.broadcast_object(ckpts[-1].name if resume and ckpts else None, info)
    if chosen:
        path = out / "checkpoints" / chosen
        if not path.is_dir():
            raise RunFolderError(f"rank {info.rank}: {path} not found; resuming on several "
                                 "machines needs output_dir on a shared filesystem")
        state = load_checkpoint(path, model, deferred)
        check_resume_state(state, cfg, path)
        start_step = state["step"]
        log(f"resumed from {path} at step {start_step}")
    if mode == "fsdp":
        wrapper = lt_dist.wrap_fsdp(model, cfg.train.loss_chunk, device, info.world_size)
    else:
        unused = method_record(cfg.adapter.method).unused_parameters
        wrapper = lt_dist.wrap_ddp(model, cfg.train.loss_chunk, device, find_unused=unused)
    optimizer = build_optimizer(model, cfg.train)
    if deferred.state is not None:
        target = lt_dist.FullStateOptimizer(optimizer) if mode == "fsdp" else optimizer
        target.load_state_dict(deferred.state)
    # Dropout draws differ per rank (ranks see different rows); equal within a rank on resume.
    torch.manual_seed(cfg.train.seed + 7919 * info.rank + start_step)
    return wrapper, optimizer, start_step


class _Saver:
    """Checkpoints and the final adapter: rank 0 writes; under FSDP every rank gathers first."""

    def __init__(self, cfg, model, optimizer, wrapper, mode, info: DistInfo, out: Path):
        self.cfg, self.model, self.optimizer, self.wrapper = cfg, model, optimizer, wrapper
        self.fsdp, self.info, self.out = mode == "fsdp" and info.enabled, info, out

    def _gathered(self):
        return lt_dist.GatheredAdapter(self.wrapper) if self.fsdp else nullcontext()

    def checkpoint(self, step: int, total_steps: int) -> None:
        optimizer = self.optimizer
        if self.fsdp:
            optimizer = _Snapshot(lt_dist.FullStateOptimizer(self.optimizer).state_dict())
        with self._gathered():
            if self.info.is_main:
                save_checkpoint(self.out / "checkpoints", step, self.model, optimizer,
                                resume_state(self.cfg, total_steps),
                                keep=self.cfg.train.save_total_limit)
        lt_dist.barrier(self.info)

    def final_adapter(self) -> Path:
        adapter_dir = self.out / "adapter"
        with self._gathered():
            if self.info.is_main:
                adapter_dir = save_adapter(self.model, adapter_dir, "default",
                                           base_model=self.cfg.model.name, overwrite=True)
        return adapter_dir


class _Snapshot:
    def __init__(self, sd: dict):
        self.sd = sd

    def state_dict(self) -> dict:
        return self.sd


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 1024), 1)


def _write_json_atomic(path: Path, obj: dict) -> None:
    import json

    write_atomic_file(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"),
                      overwrite=True)


def _write_config(out: Path, cfg: RunConfig) -> None:
    text = yaml.safe_dump(cfg.model_dump(), sort_keys=False)
    write_atomic_file(out / "config.yaml", lambda tmp: tmp.write_text(text), overwrite=True)
