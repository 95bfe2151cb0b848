"""The LoRA SFT recipe: setup → train step → train → save, on one process or under torchrun.

`train(cfg)` reads data, loads the base model, adds the adapter, runs the optimizer loop with
gradient accumulation, evaluates held-out loss, writes metrics/checkpoints, and saves the
final adapter in PEFT format under `<output_dir>/adapter`. Started by torchrun (WORLD_SIZE > 1)
each process is one rank of the run (train/runtime.py): it runs its share of every step's
micro-batches; only rank 0 prints and writes files.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from functools import partial
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from loratune import data as lt_data
from loratune import progress as lt_progress
from loratune.data.batch_stream import streaming_reason
from loratune.data.bundled import resolve_data_paths
from loratune.data.dataset import build_image_examples
from loratune.data.hf_datasets import held_out_config
from loratune.data.mixture import (as_sources, build_held_out, build_mixture, is_mixture,
                                   mixture_line)
from loratune.data.new_tokens import add_new_tokens, check_trainable, save_tokenizer, wanted
from loratune.data.templates import store_template
from loratune.adapters import method_record, save_adapter, trainable_report
from loratune.adapters.fused_lora import set_fused_lora
from loratune.adapters.registry import TrainingHooks
from loratune.config import RunConfig
from loratune.models import load_model
from loratune.models.attention import use_packed_attention
from loratune.models.kernels import use_fused_kernels
from loratune.train import distributed as lt_dist
from loratune.train.checkpoint import (choose_checkpoint, list_checkpoints, load_checkpoint,
                                       save_checkpoint)
from loratune.train.distributed import DistInfo
from loratune.train.host_memory import use_mmap_for_large_blocks
from loratune.train.method_hooks import method_hooks
from loratune.train.metrics_log import MetricsLog, plot_loss
from loratune.train.objectives import (Objective, build_preference_data,
                                       epoch_preference_batches, is_preference, start_adapter,
                                       training_objective)
from loratune.train.offload import activation_offload, offload_notes
from loratune.train.optim import build_optimizer, set_lr
from loratune.train.preference_loss import identical_pairs_warning
from loratune.train.run_folder import (RunFolderError, check_resume_state, check_run_dir,
                                       prepare_run_dir, resume_state, write_config,
                                       write_summary)
from loratune.train.runtime import Forward, OneProcess, process_group
from loratune.train.schedule import lr_factor
from loratune.train.stream_data import StreamTrainData, setup_stream_data
from loratune.train.status import (RunInterrupted, StopRequest, recorded_outcome,
                                   stop_on_signal, write_status)
from loratune.train.trackers import check_trackers, open_trackers

DataPaths = tuple[str, str | None]  # (training file, held-out file or None)
Log = Callable[..., None]  # print, or silence on other ranks and with quiet


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


@dataclass(frozen=True)
class RunOptions:
    """How train() was asked to start: the run folder, checkpoints and console."""

    resume: bool = False
    overwrite: bool = False
    quiet: bool = False
    skip_corrupt: bool = False


def train(cfg: RunConfig, resume: bool = False, overwrite: bool = False, model=None,
          tokenizer=None, quiet: bool = False, skip_corrupt: bool = False,
          data_paths: DataPaths | None = None) -> TrainResult:
    """Train an adapter as `cfg` says; under torchrun, one data-parallel rank of the run.

    `skip_corrupt`: on resume, pass over corrupt newest checkpoints to the newest readable one
    (without it a corrupt newest checkpoint is an error that names both). `data_paths`: the
    training and held-out files when the caller resolved them; None: the files cfg.data names
    (`demo`: the bundled set)."""
    opts = RunOptions(resume, overwrite, quiet, skip_corrupt)
    info = DistInfo.from_env()
    mode = lt_dist.check_parallel_options(cfg.train, cfg.adapter.method, info)
    check_run_dir(Path(cfg.output_dir), resume, overwrite)  # fail before the slow setup
    check_trackers(cfg.train.report_to)
    paths = data_paths or resolve_data_paths(cfg)
    seed_everything(cfg.train.seed)
    model, tokenizer = load_base(cfg, info, model, tokenizer)
    with process_group(info, mode, device_of(model), cfg.train.dist_timeout) as runtime:
        run = setup(cfg, opts, runtime, model, tokenizer, paths)
        with recorded_outcome(run.out, runtime.is_main, run.metrics), \
                stop_on_signal() as run.stop:
            progress = train_steps(run)
            return save(run, progress)


# ---------------------------------------------------------------------------------- setup


@dataclass
class TrainData:
    """The training examples as one stream of micro-batches over epochs, and held-out batches."""

    cfg: RunConfig
    examples: list
    packing: bool
    pad_id: int
    eval_batches: list[dict]
    make_epoch: Callable[[int], list[dict]] | None = None  # preference data: its own batches
    eval_sources: dict[str, list[dict]] = field(default_factory=dict)  # data.eval as a list
    mixture: dict | None = None  # data.train as a list: the shares realised (data/mixture.py)
    streaming: ClassVar[bool] = False  # read whole (train/stream_data.py streams)
    n_batches: int = field(init=False)  # micro-batches per epoch
    _epochs: dict[int, list[dict]] = field(default_factory=dict, init=False)  # the current one

    def __post_init__(self):
        self.n_batches = len(self._epoch(0))

    def micro_batches(self, step: int) -> list[dict]:
        """All train.grad_accum micro-batches of optimizer step `step` (every rank's)."""
        accum = self.cfg.train.grad_accum
        # The data is one stream of epochs: a step may span the end of one and the next.
        return [self._batch(step * accum + k) for k in range(accum)]

    def checkpoint_state(self) -> dict:
        return {}  # the batches are a pure function of (seed, step)

    def resume(self, state: dict, checkpoint: Path) -> None:
        if "data_position" in state:
            raise ValueError(f"{checkpoint} was written by a run that streamed data.train; "
                             "resume with data.streaming: true")

    def _batch(self, index: int) -> dict:
        epoch, pos = divmod(index, self.n_batches)
        return self._epoch(epoch)[pos]

    def _epoch(self, epoch: int) -> list[dict]:
        if epoch not in self._epochs:
            self._epochs.clear()
            self._epochs[epoch] = self.make_epoch(epoch) if self.make_epoch else \
                epoch_batches(self.cfg, self.examples, self.packing, self.pad_id, epoch)
        return self._epochs[epoch]


@dataclass
class Run:
    """What setup() built, for the training steps and the save."""

    cfg: RunConfig
    runtime: OneProcess
    model: nn.Module
    forward: Forward
    optimizer: torch.optim.Optimizer
    hooks: TrainingHooks
    objective: Objective
    data: TrainData | StreamTrainData
    metrics: MetricsLog
    total_steps: int
    start_step: int
    quiet: bool
    before: Totals  # what the earlier parts of a resumed run did (zeros on a fresh start)
    stop: StopRequest = field(default_factory=StopRequest)  # SIGINT/SIGTERM: stop at a step
    tokenizer: object = None  # saved with the adapter when data.add_tokens grew it

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def warmup(self) -> int:
        return int(self.cfg.train.warmup_ratio * self.total_steps)


def setup(cfg: RunConfig, opts: RunOptions, runtime: OneProcess, model: nn.Module, tokenizer,
          paths: DataPaths) -> Run:
    """Data, adapter, run folder, optimizer and resume point, in an order where every refusal
    comes before the run folder is touched (a refused resume leaves config.yaml as it was)."""
    quiet = opts.quiet or not runtime.is_main  # rank 0 alone prints, logs and writes files
    log: Log = _silent if quiet else print
    objective = training_objective(cfg)
    if wanted(cfg.data):  # before the data is encoded: texts may hold the new tokens
        add_new_tokens(model, tokenizer, cfg.data)
        check_trainable(getattr(cfg.adapter, "modules_to_save", None) or [], model)
    data = setup_data(cfg, tokenizer, paths, log)
    note = use_packed_attention(model, cfg.model.packed_attention, runtime.device, data.packing)
    if note:
        log(note)
    if cfg.model.fused_kernels:
        for note in use_fused_kernels(model, runtime.device):
            log(note)
    setup_adapter(cfg, model, tokenizer, log)
    out = Path(cfg.output_dir)
    # Only now, with data, model and adapter known good, is the run folder created.
    if runtime.is_main:
        prepare_run_dir(out, opts.resume, opts.overwrite)
    runtime.barrier()  # the others look for checkpoints only once the folder is settled
    for note in runtime.notes(cfg.train.grad_accum):
        log(note)
    if cfg.train.gradient_checkpointing:
        set_checkpointing(model, True)
    total = total_steps(cfg, data.n_batches)
    hooks = method_hooks(model, cfg.adapter, "default", total, data)
    checkpoint = resume_checkpoint(cfg, opts, runtime, out, log)
    if is_preference(cfg) and cfg.train.preference.reference == "cached":
        # Before the runtime wraps the model: FSDP's sharded parameters run only in its forward.
        setup_reference_cache(cfg, runtime, model, objective, data, out, log)
    forward, optimizer, state = setup_optimizer(cfg, runtime, model, checkpoint, log, objective,
                                                hooks)
    start_step, before = state.get("step", 0), Totals.before(state)
    if checkpoint is not None:
        data.resume(state, checkpoint)
    if runtime.is_main:
        write_config(out, cfg)
        write_status(out, "running", step=start_step, total_steps=total, **before.record())
    for note in offload_notes(cfg.train, runtime.device):
        log(note)
    metrics = open_metrics(out, runtime, opts.resume, start_step)
    if runtime.is_main:
        metrics.trackers = open_trackers(cfg, out)
        if start_step == 0 and getattr(data, "mixture", None):  # the shares, once per run
            metrics.write({"step": 0, **{f"mixture_share/{name}": s["share"]
                                         for name, s in data.mixture["sources"].items()}})
    return Run(cfg, runtime, model, forward, optimizer, hooks, objective, data, metrics, total,
               start_step, quiet, before, tokenizer=tokenizer)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def low_host_memory(cfg: RunConfig) -> bool:
    if cfg.train.host_memory == "auto":
        return cfg.model.quantization is not None
    return cfg.train.host_memory == "low"


def load_base(cfg: RunConfig, info: DistInfo, model: nn.Module | None,
              tokenizer) -> tuple[nn.Module, object]:
    """The caller's model and tokenizer, or the ones cfg.model names (under torchrun on CUDA,
    on this rank's GPU)."""
    if low_host_memory(cfg):
        use_mmap_for_large_blocks()
    if model is None:
        device = lt_dist.device_for(cfg.model.device, info)
        model, tokenizer = load_model(cfg.model.model_copy(update={"device": device}))
    return model, tokenizer


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def build_data(cfg: RunConfig, tokenizer, paths: DataPaths | None = None):
    """(training examples, held-out examples, stats, packing on) from the files."""
    train_path, eval_path = paths or resolve_data_paths(cfg)
    train_ex, stats = read_examples(train_path, tokenizer, cfg.data)
    eval_ex = []
    if eval_path:
        eval_ex, _ = read_examples(eval_path, tokenizer, held_out_config(cfg.data))
    elif cfg.data.eval_fraction:
        train_ex, eval_ex = lt_data.split_heldout(train_ex, cfg.data.eval_fraction, cfg.train.seed)
    packing = packing_setting(cfg)
    if getattr(tokenizer, "image_encoder", None) is not None:
        packing = False  # refuse_for_images refused `true`
    if packing == "auto":
        packing = lt_data.should_pack(train_ex, cfg.data.max_length, cfg.train.batch_size)
    return train_ex, eval_ex, stats, bool(packing)


def read_examples(path, tokenizer, data_cfg):
    """A data file's examples: image conversations where the model is a vision-language one
    (its tokenizer carries the image encoder, models/load.py), else text."""
    encoder = getattr(tokenizer, "image_encoder", None)
    if encoder is None:
        return lt_data.build_examples(path, tokenizer, data_cfg)
    encode = partial(encoder, tokenizer, max_length=data_cfg.max_length)
    return build_image_examples(path, data_cfg, encode)


def refuse_for_images(cfg: RunConfig, tokenizer, paths: DataPaths) -> None:
    """What image data does not do yet, refused by name before anything is encoded."""
    if getattr(tokenizer, "image_encoder", None) is None:
        return
    if cfg.data.packing is True:
        raise ValueError("data.packing: true with a vision-language model: image examples are "
                         "padded one per row, never packed; use auto/false")
    if is_mixture(paths[0]) or is_mixture(paths[1]) or streaming_reason(cfg.data, paths[0]):
        raise ValueError("data.train/data.eval: a list of sources or streamed data with a "
                         "vision-language model is not supported; name one file")
    if is_preference(cfg):
        raise ValueError(f"train.objective: {cfg.train.objective} with a vision-language "
                         "model is not supported; use sft")


def packing_setting(cfg: RunConfig) -> bool | str:
    """data.packing as the method and format allow: True, False, or "auto" (decided on the
    examples)."""
    packing = cfg.data.packing
    why_not = method_record(cfg.adapter.method).training.why_no_packing
    if why_not is not None:
        if packing is True:
            raise ValueError(f"data.packing: true does not work with adapter.method: "
                             f"{cfg.adapter.method} ({why_not}); use auto/false")
        return False
    if packing == "auto" and cfg.data.format == "text":
        return True  # documents and their pieces share rows: no padding, no cross-attention
    return packing


def epoch_batches(cfg: RunConfig, examples, packing: bool, pad_id: int, epoch: int) -> list[dict]:
    return lt_data.batches(examples, cfg.train.batch_size, cfg.data.max_length, packing,
                           pad_id=pad_id, seed=cfg.train.seed, epoch=epoch)


def setup_data(cfg: RunConfig, tokenizer, paths: DataPaths,
               log: Log) -> TrainData | StreamTrainData:
    refuse_for_images(cfg, tokenizer, paths)
    if is_mixture(paths[0]) or is_mixture(paths[1]):
        return setup_mixture_data(cfg, tokenizer, paths, log)
    why = streaming_reason(cfg.data, paths[0])
    if why:
        return setup_stream_data(cfg, tokenizer, paths, why, packing_setting(cfg), log)
    if is_preference(cfg):
        return setup_preference_data(cfg, tokenizer, paths, log)
    train_ex, eval_ex, stats, packing = build_data(cfg, tokenizer, paths)
    log(f"data: {stats.n_examples} examples ({stats.format}), {stats.n_truncated} truncated, "
        f"{stats.dropped()}; packing={'on' if packing else 'off'}; "
        f"held-out: {len(eval_ex)}{stats.noted()}")
    if not train_ex:
        raise ValueError(f"no training examples left in {cfg.data.train}")
    pad_id = tokenizer.pad_token_id
    eval_batches = epoch_batches(cfg, eval_ex, packing, pad_id, 0) if eval_ex else []
    return TrainData(cfg, train_ex, packing, pad_id, eval_batches)


def setup_mixture_data(cfg: RunConfig, tokenizer, paths: DataPaths, log: Log) -> TrainData:
    """data.train and/or data.eval as lists of sources: the mixture drawn once from train.seed
    (so resume rebuilds the same one), held-out batches per source."""
    refuse_mixture(cfg)
    train_ex, stats, record = build_mixture(as_sources(paths[0]), tokenizer, cfg.data,
                                            cfg.train.seed)
    held = build_held_out(as_sources(paths[1]), tokenizer, held_out_config(cfg.data)) \
        if paths[1] else {}
    packing = packing_setting(cfg)
    if packing == "auto":
        packing = lt_data.should_pack(train_ex, cfg.data.max_length, cfg.train.batch_size)
    log(f"data: {stats.n_examples} examples ({stats.format}), {stats.n_truncated} truncated, "
        f"{stats.dropped()}; packing={'on' if packing else 'off'}; "
        f"held-out: {sum(map(len, held.values()))}{stats.noted()}")
    if is_mixture(paths[0]):
        log(mixture_line(record))
    pad_id = tokenizer.pad_token_id
    sources = {name: epoch_batches(cfg, ex, bool(packing), pad_id, 0) for name, ex in held.items()}
    return TrainData(cfg, train_ex, bool(packing), pad_id,
                     [b for batches in sources.values() for b in batches],
                     eval_sources=sources if is_mixture(paths[1]) else {},
                     mixture=record if is_mixture(paths[0]) else None)


def refuse_mixture(cfg: RunConfig) -> None:
    """What a mixture cannot be read with, by name."""
    if cfg.data.streaming is True:
        raise ValueError("data.train/data.eval as a list of sources is read whole; "
                         "data.streaming: true streams one source (set it to false or auto)")
    if is_preference(cfg):
        raise ValueError(f"train.objective {cfg.train.objective} reads one data.train file of "
                         "pairs; a list of sources (a mixture) is for SFT and text data")
    if is_mixture(cfg.data.train) and cfg.data.eval_fraction and cfg.data.eval is None:
        raise ValueError("data.eval_fraction with a mixture would hold out examples the "
                         "mixture may repeat; give held-out data per source as data.eval")


def setup_preference_data(cfg: RunConfig, tokenizer, paths: DataPaths, log: Log) -> TrainData:
    """Pairs (or KTO examples), one per row side, never packed."""
    train_ex, eval_ex, stats = build_preference_data(cfg, tokenizer, paths)
    log(f"data: {stats.n_examples} {stats.format} examples for {cfg.train.objective}, "
        f"{stats.n_truncated} truncated (prompt first), {stats.dropped()}; "
        f"held-out: {len(eval_ex)}")
    warning = identical_pairs_warning(stats, paths[0], cfg.train.objective)
    if warning:
        log(warning)
    pad_id = tokenizer.pad_token_id
    eval_batches = epoch_preference_batches(cfg, eval_ex, pad_id, 0) if eval_ex else []
    return TrainData(cfg, train_ex, False, pad_id, eval_batches,
                     make_epoch=lambda epoch: epoch_preference_batches(cfg, train_ex, pad_id,
                                                                       epoch))


def setup_reference_cache(cfg: RunConfig, runtime: OneProcess, model: nn.Module,
                          objective: Objective, data: TrainData, out: Path, log: Log) -> None:
    """Reference log-probs of every training example, read from or written to the run folder."""
    from loratune.train.reference_cache import CACHE_FILE, cached_reference

    label = f"{cfg.model.name}|{cfg.adapter.init_from}|{cfg.train.objective}"
    found = cached_reference(model, objective.reference, data.examples, data.pad_id,
                             cfg.train.batch_size, runtime.device, out, runtime.is_main, label,
                             cfg.train.loss_chunk)
    data._epochs.clear()  # batches made before carry no reference log-probs
    log(f"reference log-probs: {'read from' if found else 'computed once, kept in'} "
        f"{out / CACHE_FILE}")


def check_context(cfg: RunConfig, model: nn.Module) -> None:
    """Virtual tokens take context positions: they and the longest row must fit the model."""
    virtual_tokens = method_record(cfg.adapter.method).training.virtual_tokens
    n = virtual_tokens(cfg.adapter) if virtual_tokens else 0
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if n and limit and n + cfg.data.max_length > limit:
        raise ValueError(f"adapter.num_virtual_tokens={n} plus data.max_length="
                         f"{cfg.data.max_length} exceeds the model's context of {limit} positions; "
                         f"use at most {max(limit - cfg.data.max_length, 0)} virtual tokens or a "
                         "shorter max_length")


def setup_adapter(cfg: RunConfig, model: nn.Module, tokenizer, log: Log) -> None:
    check_context(cfg, model)
    torch.manual_seed(cfg.train.seed)  # the adapter's initial weights depend on the seed alone
    start_adapter(cfg, model, tokenizer)
    set_fused_lora(model, cfg.train.fused_lora)
    log(trainable_report(model)[2])


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


def total_steps(cfg: RunConfig, n_batches: int) -> int:
    """train.max_steps, or the optimizer steps in train.epochs passes over the data."""
    steps_per_epoch = max(1, n_batches // cfg.train.grad_accum)
    return cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))


def resume_checkpoint(cfg: RunConfig, opts: RunOptions, runtime: OneProcess, out: Path,
                      log: Log) -> Path | None:
    """The checkpoint this start resumes from; None: a fresh start."""
    root = out / "checkpoints"
    ckpts = list_checkpoints(root) if opts.resume else []
    # The newest readable one: newer ones are corrupt, skipped only on request.
    chosen = choose_checkpoint(ckpts, opts.skip_corrupt, log) if ckpts else None
    if chosen is not None:
        check_method_resumes(cfg)
    return runtime.agree_on_checkpoint(chosen, root)


def check_method_resumes(cfg: RunConfig) -> None:
    """Refuse to resume a method whose checkpoints cannot restore it (its record says why)."""
    why_not = method_record(cfg.adapter.method).training.why_no_resume
    why = why_not(cfg.adapter) if why_not else None
    if why:
        raise RunFolderError(f"resume is not supported for adapter.method: "
                             f"{cfg.adapter.method} ({why}); start over with --overwrite")


class _DeferredOptimizerState:
    """Catches the optimizer state load_checkpoint restores, to apply once the optimizer exists."""

    def __init__(self):
        self.state: dict | None = None

    def load_state_dict(self, sd: dict) -> None:
        self.state = sd


def setup_optimizer(cfg: RunConfig, runtime: OneProcess, model: nn.Module,
                    checkpoint: Path | None, log: Log, objective: Objective,
                    hooks=None) -> tuple[Forward, torch.optim.Optimizer, dict]:
    """Resume into the plain model (and the method's hooks: AdaLoRA's rank allocator), wrap it
    for the runtime, then build the optimizer (FSDP replaces the parameters by shards, which
    the optimizer must hold); the checkpoint's trainer state ({} on a fresh start)."""
    state, deferred = {}, _DeferredOptimizerState()
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, deferred, hooks=hooks)
        check_resume_state(state, cfg, checkpoint)
        log(f"resumed from {checkpoint} at step {state['step']}")
    forward = runtime.wrap_model(model, cfg, objective if is_preference(cfg) else None)
    optimizer = build_optimizer(model, cfg.train)
    if deferred.state is not None:
        runtime.load_optimizer_state(optimizer, deferred.state)
    runtime.seed_training(cfg.train.seed, state.get("step", 0))
    return forward, optimizer, state


def open_metrics(out: Path, runtime: OneProcess, resume: bool, start_step: int) -> MetricsLog:
    """metrics.jsonl: cut back to the checkpoint on resume, started afresh otherwise."""
    metrics = MetricsLog(out / "metrics.jsonl", enabled=runtime.is_main)
    if runtime.is_main and resume and start_step:
        metrics.truncate_after(start_step)
    elif runtime.is_main and not resume:
        metrics.path.unlink(missing_ok=True)
    return metrics


def _silent(*args, **kwargs) -> None:
    pass


# ----------------------------------------------------------------------------- train step


@dataclass
class StepStats:
    """What one optimizer step did; `record()` is its line in metrics.jsonl."""

    step: int  # steps done, this one included
    loss: float  # token-mean loss of the whole step (every rank's micro-batches)
    lr: float
    grad_norm: float | None
    tokens: int
    label_tokens: int
    seconds: float
    extra_loss: float = 0.0  # the method's own terms (MoE balance, AdaLoRA orthogonality)

    def record(self) -> dict:
        out = {"step": self.step, "loss": round(self.loss, 6), "lr": self.lr,
               "grad_norm": self.grad_norm, "tokens": self.tokens,
               "label_tokens": self.label_tokens, "seconds": round(self.seconds, 4),
               "tokens_per_s": round(self.tokens / self.seconds, 1)}
        if self.extra_loss:
            out["extra_loss"] = round(self.extra_loss, 6)
        return out


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_step(run: Run, step: int) -> StepStats:
    """Optimizer step `step` (0-based): this rank's micro-batches forward and backward, the
    gradients summed over ranks, clipped and applied."""
    t0 = time.perf_counter()
    lr = set_lr(run.optimizer, lr_factor(step, run.total_steps, run.warmup,
                                         run.cfg.train.schedule))
    micro = run.data.micro_batches(step)
    # Every rank builds the whole step, so the label count (pairs for preference objectives) is
    # the global one.
    n_labels = sum(run.objective.units(b) for b in micro)
    tokens = sum(int(b["input_ids"].numel()) for b in micro)
    step_loss, extra_loss = run.runtime.sum(accumulate_gradients(run, micro, n_labels))
    extra = run.hooks.step_loss()
    if extra is not None:
        extra.backward()
        extra_loss += float(extra.detach())
    grad_norm = clip_gradients(run.optimizer, run.cfg.train.max_grad_norm)
    run.optimizer.step()
    run.hooks.after_step(step + 1)
    run.optimizer.zero_grad(set_to_none=True)
    return StepStats(step + 1, step_loss / max(n_labels, 1), lr, grad_norm, tokens, n_labels,
                     time.perf_counter() - t0, extra_loss)


def accumulate_gradients(run: Run, micro: list[dict], n_labels: int) -> list[float]:
    """Forward and backward of this rank's micro-batches of a step; returns the summed token
    loss and the method's extra loss of these micro-batches."""
    runtime, train_cfg = run.runtime, run.cfg.train
    mine = runtime.micro_batches(train_cfg.grad_accum)
    step_loss = extra_loss = 0.0
    for i, k in enumerate(mine):
        with runtime.grad_sync(last=i == len(mine) - 1):
            batch = to_device(micro[k], runtime.device)
            with activation_offload(train_cfg.offload_activations, runtime.device, run.model):
                loss_sum, _ = run.forward(batch)
            # Normalize by the step's label count: the token-level mean over all micro-batches.
            loss = loss_sum / max(n_labels, 1)
            extra = run.hooks.micro_loss()
            if extra is not None:
                loss = loss + extra / len(micro)
                extra_loss += float(extra.detach()) / len(micro)
            loss.backward()
        step_loss += float(loss_sum.detach())
    return [step_loss, extra_loss]


def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float | None) -> float | None:
    """Clip to train.max_grad_norm; the norm before clipping (None when not clipping)."""
    if not max_norm:
        return None
    params = [p for g in optimizer.param_groups for p in g["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(lt_dist.full_tensor(norm))  # a collective under FSDP: every rank calls it


@torch.no_grad()
def evaluate_loss(model: nn.Module, forward: Forward, batches: list[dict],
                  runtime: OneProcess, show: bool = True) -> float | None:
    """Held-out loss per label token; the runtime decides which batches each rank runs."""
    total, count = held_out_sums(model, forward, batches, runtime, show)
    return total / count if count else None


@torch.no_grad()
def held_out_sums(model: nn.Module, forward: Forward, batches: list[dict],
                  runtime: OneProcess, show: bool = True) -> tuple[float, int]:
    """(summed held-out loss, label tokens) over every rank."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    mine = list(runtime.eval_batches(batches))
    with lt_progress.bar("held-out loss", len(mine), "batches",
                         enabled=show and runtime.is_main) as bar:
        for batch in mine:
            loss, n = forward(to_device(batch, runtime.device))
            total += float(loss)
            count += n
            bar.update(1)
    model.train(was_training)
    total, count = runtime.sum_eval([total, count])
    return total, int(count)


def held_out_losses(run: Run) -> tuple[float | None, dict[str, float]]:
    """The held-out loss, and with data.eval as a list each source's as eval_loss/NAME (the
    overall loss then weighs every label token alike, as one file would)."""
    sources = getattr(run.data, "eval_sources", None)
    if not sources:
        return evaluate_loss(run.model, run.forward, run.data.eval_batches, run.runtime,
                             not run.quiet), {}
    sums = {name: held_out_sums(run.model, run.forward, batches, run.runtime, not run.quiet)
            for name, batches in sources.items()}
    total, count = (sum(part) for part in zip(*sums.values()))
    return (total / count if count else None,
            {f"eval_loss/{name}": round(t / n, 6) for name, (t, n) in sums.items() if n})


# ---------------------------------------------------------------------------------- train


@dataclass
class Totals:
    """What a run did so far over all its parts (a stop and each --resume start a new part):
    written into every checkpoint, so a resumed run counts its earlier parts too."""

    seconds: float = 0.0   # wall seconds of the training loop up to the checkpoint
    tokens: int = 0
    label_tokens: int = 0
    parts: int = 1

    def record(self) -> dict:
        return {"seconds": round(self.seconds, 2), "tokens": self.tokens,
                "label_tokens": self.label_tokens, "parts": self.parts}

    @classmethod
    def before(cls, state: dict) -> Totals:
        """The totals of the parts before this one, from a checkpoint's trainer state ({}: a
        fresh start; a checkpoint older than the record counts its part as 0 s and 0 tokens)."""
        if not state:
            return cls(parts=0)
        done = state.get("totals") or {}
        return cls(float(done.get("seconds", 0.0)), int(done.get("tokens", 0)),
                   int(done.get("label_tokens", 0)), int(done.get("parts", 1)))


@dataclass
class Progress:
    """What the run did so far, earlier parts included, for checkpoints, the result and
    run_summary.json; `history` holds this part's steps only."""

    totals: Totals
    history: list[dict] = field(default_factory=list)
    loss: float = float("nan")
    eval_loss: float | None = None
    eval_by_source: dict[str, float] = field(default_factory=dict)  # eval_loss/NAME -> loss
    started: float = field(default_factory=time.perf_counter)  # this part's first step

    @classmethod
    def after(cls, before: Totals) -> Progress:
        return cls(Totals(before.seconds, before.tokens, before.label_tokens, before.parts + 1))

    def add(self, stats: StepStats) -> None:
        self.totals.tokens += stats.tokens
        self.totals.label_tokens += stats.label_tokens
        self.loss = stats.loss

    def mark_time(self, before: Totals) -> None:
        self.totals.seconds = before.seconds + time.perf_counter() - self.started


def train_steps(run: Run) -> Progress:
    """Steps start_step..total_steps, with held-out loss, metrics and checkpoints on the way."""
    progress = Progress.after(run.before)
    run.model.train()
    with lt_progress.bar("train", run.total_steps, "steps", run.start_step,
                         enabled=not run.quiet) as bar:
        for step in range(run.start_step, run.total_steps):
            _one_step(run, step, progress, bar)
    progress.mark_time(run.before)
    return progress


def _one_step(run: Run, step: int, progress: Progress, bar: lt_progress.Bar) -> None:
    """Optimizer step `step`, then its held-out loss, metrics line, checkpoint and stop check."""
    train_cfg = run.cfg.train
    stats = train_step(run, step)
    progress.add(stats)
    record = stats.record()
    record.update(run.objective.take_metrics(run.runtime.sum))
    every = train_cfg.eval_every
    if run.data.eval_batches and every and stats.step % every == 0:
        progress.eval_loss, progress.eval_by_source = held_out_losses(run)
        record["eval_loss"] = round(progress.eval_loss, 6)
        record.update(progress.eval_by_source)
        record.update(run.objective.take_metrics(run.runtime.sum_eval, "eval_"))
    if stats.step % train_cfg.log_every == 0 or "eval_loss" in record:
        run.metrics.write(record)
    progress.history.append(record)
    seen = {"tokens": f"{progress.totals.tokens:,}"} if run.data.streaming else {}
    bar.set_postfix(loss=f"{stats.loss:.4f}", lr=f"{stats.lr:.2e}",
                    tok_s=f"{stats.tokens / stats.seconds:.0f}", **preference_postfix(record),
                    **seen)
    bar.update(1)
    progress.mark_time(run.before)
    if train_cfg.save_every and stats.step % train_cfg.save_every == 0 \
            and stats.step < run.total_steps:
        save_step_checkpoint(run, stats.step, progress.totals)
    stop_if_asked(run, stats.step, progress.totals)


def stop_if_asked(run: Run, step: int, totals: Totals) -> None:
    """After SIGINT/SIGTERM (on any rank): checkpoint step `step`, raise RunInterrupted. At
    the last step the run just finishes."""
    asked = run.runtime.sum([float(run.stop.requested)])[0] > 0  # all ranks stop at one step
    if not asked or step >= run.total_steps:
        return
    ckpt = run.out / "checkpoints" / f"step-{step:08d}"
    if ckpt not in list_checkpoints(run.out / "checkpoints"):  # save_every may have written it
        save_step_checkpoint(run, step, totals)
    raise RunInterrupted(step, ckpt, totals.record())


def preference_postfix(record: dict) -> dict[str, str]:
    """The progress bar's share of a preference step's metrics: accuracy and margin."""
    short = {"accuracy": "acc", "margin": "margin", "kl": "kl"}
    return {name: f"{record[key]:.3f}" for key, name in short.items() if key in record}


# ----------------------------------------------------------------------------------- save


def save_step_checkpoint(run: Run, step: int, totals: Totals) -> None:
    """checkpoints/step-N (with the run's totals up to it): rank 0 writes, then says so in
    status.json; a sharded run gathers on every rank first."""
    optimizer = run.runtime.optimizer_to_save(run.optimizer)
    with run.runtime.gathered():
        if run.runtime.is_main:
            ckpt = save_checkpoint(run.out / "checkpoints", step, run.model, optimizer,
                                   {**resume_state(run.cfg, run.total_steps),
                                    "totals": totals.record(), **run.data.checkpoint_state()},
                                   keep=run.cfg.train.save_total_limit, hooks=run.hooks)
            write_status(run.out, "running", step=step, total_steps=run.total_steps,
                         checkpoint=str(ckpt), **totals.record())
    run.runtime.barrier()


def save(run: Run, progress: Progress) -> TrainResult:
    """The final held-out loss, the adapter, the loss curve, and run_summary.json last (its
    presence marks the run finished)."""
    last = progress.history[-1] if progress.history else {}
    measured = last.get("step") == run.total_steps and "eval_loss" in last  # eval_every did
    if run.data.eval_batches and not measured:
        progress.eval_loss, progress.eval_by_source = held_out_losses(run)
        run.metrics.write({"step": run.total_steps, "eval_loss": round(progress.eval_loss, 6),
                           **progress.eval_by_source,
                           **run.objective.take_metrics(run.runtime.sum_eval, "eval_")})
    if run.cfg.train.gradient_checkpointing:
        set_checkpointing(run.model, False)
    run.model.eval()
    adapter_dir = run.out / "adapter"
    with run.runtime.gathered():
        if run.runtime.is_main:
            adapter_dir = save_adapter(run.model, adapter_dir, "default",
                                       base_model=run.cfg.model.name, overwrite=True)
            store_template(adapter_dir, run.cfg.data.template)  # eval/serve prompt with it
            if wanted(run.cfg.data):
                save_tokenizer(run.tokenizer, adapter_dir, run.cfg.data)
    if run.runtime.is_main:
        plot_loss(run.out / "metrics.jsonl", run.out / "loss.png")
        write_summary(run.out, run_summary(run, progress))
        write_status(run.out, "finished", step=run.total_steps, **progress.totals.record())
    run.metrics.close("finished", adapter_dir)
    run.runtime.barrier()  # the other ranks return once rank 0 has written everything
    totals = progress.totals
    return TrainResult(run.out, adapter_dir, run.total_steps, progress.loss,
                       progress.eval_loss, totals.seconds, totals.tokens, totals.label_tokens,
                       progress.history)


def run_summary(run: Run, progress: Progress) -> dict:
    """run_summary.json: seconds, tokens and steps of the whole run, every part counted."""
    n_trainable, n_all, report = trainable_report(run.model)
    totals = progress.totals
    return {"steps": run.total_steps, "final_loss": progress.loss,
            "eval_loss": progress.eval_loss, "train_seconds": round(totals.seconds, 2),
            "tokens": totals.tokens, "label_tokens": totals.label_tokens,
            "parts": totals.parts,
            "packing": run.data.packing, "trainable": report, "trainable_params": n_trainable,
            "all_params": n_all, "method": run.cfg.adapter.method,
            "objective": run.cfg.train.objective,
            "seconds_per_step": round(totals.seconds / max(run.total_steps, 1), 4),
            "peak_rss_mib": peak_rss_mib(), **run.hooks.summary(), **run.runtime.summary(),
            **mixture_summary(run, progress)}


def mixture_summary(run: Run, progress: Progress) -> dict:
    """A mixture's realised shares and the held-out loss per source, when there are any."""
    out = {"mixture": run.data.mixture} if getattr(run.data, "mixture", None) else {}
    if progress.eval_by_source:
        out["eval_loss_by_source"] = {k.partition("/")[2]: v
                                      for k, v in progress.eval_by_source.items()}
    return out


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 1024), 1)
