"""The LoRA SFT recipe: setup → train → save, in that order, on one process.

`train(cfg)` reads data, loads the base model, adds the adapter, runs the optimizer loop with
gradient accumulation, evaluates held-out loss, writes metrics/checkpoints, and saves the
final adapter in PEFT format under `<output_dir>/adapter`.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn

from loratune import data as lt_data
from loratune.adapters import add_adapter, save_adapter, trainable_report
from loratune.config import RunConfig
from loratune.models import load_model
from loratune.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
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
    if not out.exists() or overwrite:
        return
    finished = (out / DONE_FILE).is_file()
    has_ckpt = bool(list_checkpoints(out / "checkpoints"))
    if resume and not finished:
        return
    if finished:
        raise RunFolderError(f"{out} holds a finished run; pass --overwrite to start a new one "
                             "(the old one is kept as a backup), or choose another output_dir")
    if has_ckpt:
        raise RunFolderError(f"{out} holds checkpoints of an unfinished run: pass --resume to "
                             "continue it or --overwrite to start over")
    if any(p.name != "config.yaml" for p in out.iterdir()):
        raise RunFolderError(f"{out} is not empty; pass --overwrite or choose another output_dir")


def prepare_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Create the run folder; with overwrite, an existing one is kept under a backup name."""
    check_run_dir(out, resume, overwrite)
    if overwrite and out.exists():
        backup = out.with_name(f"{out.name}.bak-{time.strftime('%Y%m%d-%H%M%S')}")
        out.rename(backup)
        print(f"previous run moved to {backup}")
    out.mkdir(parents=True, exist_ok=True)


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
    if cfg.adapter.method in ("prompt", "prefix"):
        # Virtual tokens go in front of each row; samples packed into one row cannot share them.
        if packing is True:
            raise ValueError(f"data.packing: true does not work with adapter.method: "
                             f"{cfg.adapter.method} (virtual tokens lead each row); use auto/false")
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
def evaluate_loss(model: nn.Module, batches: list[dict], device, chunk: int) -> float | None:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        loss, n = causal_lm_loss(model, to_device(batch, device), chunk)
        total += float(loss)
        count += n
    model.train(was_training)
    return total / count if count else None


def _progress(total: int, start: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, desc="train", unit="step",
                mininterval=2.0,
                dynamic_ncols=True)


def train(cfg: RunConfig, resume: bool = False, overwrite: bool = False, model=None,
          tokenizer=None, quiet: bool = False) -> TrainResult:
    out = Path(cfg.output_dir)
    check_run_dir(out, resume, overwrite)  # fail before the slow setup, touch nothing yet
    seed_everything(cfg.train.seed)
    if low_host_memory(cfg):
        use_mmap_for_large_blocks()
    if model is None:
        model, tokenizer = load_model(cfg.model)
    device = next(model.parameters()).device
    train_ex, eval_ex, stats, packing = build_data(cfg, tokenizer)
    log = print if not quiet else (lambda *a, **k: None)
    log(f"data: {stats.n_examples} examples ({stats.format}), {stats.n_truncated} truncated, "
        f"{stats.n_dropped} dropped; packing={'on' if packing else 'off'}; "
        f"held-out: {len(eval_ex)}")
    if not train_ex:
        raise ValueError(f"no training examples left in {cfg.data.train}")

    check_context(cfg, model)
    torch.manual_seed(cfg.train.seed)
    add_adapter(model, cfg.adapter, "default", tokenizer=tokenizer)
    log(trainable_report(model)[2])
    # Only now, with data, model and adapter known good, is the run folder created.
    prepare_run_dir(out, resume, overwrite)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    if cfg.train.gradient_checkpointing:
        set_checkpointing(model, True)
    optimizer = build_optimizer(model, cfg.train)
    for note in offload_notes(cfg.train, device):
        log(note)
    pad_id = tokenizer.pad_token_id

    n_batches = len(epoch_batches(cfg, train_ex, packing, pad_id, 0))
    steps_per_epoch = max(1, n_batches // cfg.train.grad_accum)
    total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    warmup = int(cfg.train.warmup_ratio * total_steps)
    eval_batches = epoch_batches(cfg, eval_ex, packing, pad_id, 0) if eval_ex else []
    hooks = method_hooks(model, cfg.adapter, "default", total_steps)

    metrics = MetricsLog(out / "metrics.jsonl")
    start_step = 0
    ckpts = list_checkpoints(out / "checkpoints")
    if resume and ckpts and getattr(cfg.adapter, "prefix_projection", False):
        raise RunFolderError("resume is not supported for prefix tuning with prefix_projection "
                             "(checkpoints hold the computed prefixes, not the MLP); start over "
                             "with --overwrite or train without prefix_projection")
    if resume and ckpts:
        state = load_checkpoint(ckpts[-1], model, optimizer)
        start_step = state["step"]
        metrics.truncate_after(start_step)
        log(f"resumed from {ckpts[-1]} at step {start_step}")
    elif not resume:
        metrics.path.unlink(missing_ok=True)

    model.train()
    history: list[dict] = []
    tokens_seen = label_seen = 0
    t_start = time.perf_counter()
    loss_value = float("nan")
    eval_loss = None
    bar = _progress(total_steps, start_step, not quiet)
    epoch_cache: dict[int, list[dict]] = {}
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        lr = set_lr(optimizer, lr_factor(step, total_steps, warmup, cfg.train.schedule))
        micro = []
        for k in range(cfg.train.grad_accum):
            index = step * cfg.train.grad_accum + k
            epoch, pos = divmod(index, steps_per_epoch * cfg.train.grad_accum)
            if epoch not in epoch_cache:
                epoch_cache.clear()
                epoch_cache[epoch] = epoch_batches(cfg, train_ex, packing, pad_id, epoch)
            micro.append(epoch_cache[epoch][pos])
        n_labels = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        step_loss = extra_loss = 0.0
        step_tokens = 0
        for batch in micro:
            batch = to_device(batch, device)
            with activation_offload(cfg.train.offload_activations, device):
                loss_sum, _ = causal_lm_loss(model, batch, cfg.train.loss_chunk)
            # Normalize by the step's label count: the token-level mean over all micro-batches.
            loss = loss_sum / max(n_labels, 1)
            extra = hooks.micro_loss()
            if extra is not None:
                loss = loss + extra / len(micro)
                extra_loss += float(extra.detach()) / len(micro)
            loss.backward()
            step_loss += float(loss_sum.detach())
            step_tokens += int(batch["input_ids"].numel())
        extra = hooks.step_loss()
        if extra is not None:
            extra.backward()
            extra_loss += float(extra.detach())
        grad_norm = None
        if cfg.train.max_grad_norm:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm))
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
            eval_loss = evaluate_loss(model, eval_batches, device, cfg.train.loss_chunk)
            record["eval_loss"] = round(eval_loss, 6)
        if (step + 1) % cfg.train.log_every == 0 or "eval_loss" in record:
            metrics.write(record)
        history.append(record)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{step_tokens / dt:.0f}")
        bar.update(1)
        if cfg.train.save_every and (step + 1) % cfg.train.save_every == 0 and step + 1 < total_steps:
            save_checkpoint(out / "checkpoints", step + 1, model, optimizer,
                            {"total_steps": total_steps}, keep=cfg.train.save_total_limit)
    bar.close()
    seconds = time.perf_counter() - t_start

    if eval_batches:
        eval_loss = evaluate_loss(model, eval_batches, device, cfg.train.loss_chunk)
        metrics.write({"step": total_steps, "eval_loss": round(eval_loss, 6)})
    if cfg.train.gradient_checkpointing:
        set_checkpointing(model, False)
    model.eval()
    adapter_dir = save_adapter(model, out / "adapter", "default", base_model=cfg.model.name,
                               overwrite=True)
    plot_loss(out / "metrics.jsonl", out / "loss.png")
    n_trainable, n_all, report = trainable_report(model)
    summary = {"steps": total_steps, "final_loss": loss_value, "eval_loss": eval_loss,
               "train_seconds": round(seconds, 2), "tokens": tokens_seen,
               "label_tokens": label_seen, "packing": packing,
               "trainable": report, "trainable_params": n_trainable, "all_params": n_all,
               "method": cfg.adapter.method,
               "seconds_per_step": round(seconds / max(total_steps - start_step, 1), 4),
               "peak_rss_mib": peak_rss_mib(), **hooks.summary()}
    _write_json_atomic(out / DONE_FILE, summary)
    return TrainResult(out, adapter_dir, total_steps, loss_value, eval_loss, seconds,
                       tokens_seen, label_seen, history)


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 1024), 1)


def _write_json_atomic(path: Path, obj: dict) -> None:
    import json

    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)

