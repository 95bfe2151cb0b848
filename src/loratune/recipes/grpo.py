"""The GRPO recipe (train.objective grpo), top to bottom: setup -> steps -> save.

Data rows are a `prompt` (a string, used as written, or a list of messages, rendered by the
chat template with the generation prompt) plus any columns the rewards read. A step samples
train.rl.num_generations completions for each of its batch_size x grad_accum / num_generations
prompts on the live model (train/rl_rollout.py), scores them (train/rl_rewards.py) and updates
the adapter num_iterations times (train/rl_step.py). max_steps counts these steps.

Resume is exact: a checkpoint holds the adapter, the optimizer and the step; a step's prompts
and samples depend only on (seed, step), so a resumed run repeats what the killed one would
have done. Written to the run folder: metrics.jsonl (one record per step), completions.jsonl
(sampled completions with their rewards), checkpoints/, adapter/, run_summary.json, loss.png.
With held-out prompts, step 0 of metrics.jsonl is their score before training.

Under torchrun (train.parallel ddp) rank r takes the step's micro-batches k % world == r, whole
groups, and rolls them out on its own copy of the model (train/rl_step.py gathers rewards and
sums gradients); rank 0 alone evaluates, logs and writes files.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch

from loratune.adapters import save_adapter
from loratune.adapters.base_inits import init_spec
from loratune.config import ConfigError, RunConfig
from loratune.data.bundled import resolve_data_paths
from loratune.data.formats import read_indexed
from loratune.data.mixture import as_sources, mixture_line, read_sources
from loratune.data.new_tokens import wanted
from loratune.models.modules import eos_ids
from loratune.serve.types import SamplingParams
from loratune.train.checkpoint import (choose_checkpoint, list_checkpoints, load_checkpoint,
                                       save_checkpoint)
from loratune.train.loop import (TrainResult, check_method_resumes, device_of, load_base,
                                 seed_everything, set_checkpointing)
from loratune.train.method_hooks import method_hooks
from loratune.train.metrics_log import MetricsLog, plot_loss
from loratune.train.objectives import start_adapter
from loratune.train.optim import build_optimizer, set_lr
from loratune.train.rl_rewards import load_rewards, score
from loratune.train.rl_rollout import rollout
from loratune.train.rl_step import Prompt, grpo_step, sample_lines
from loratune.train.run_folder import (check_resume_state, check_run_dir, prepare_run_dir,
                                       resume_state, write_config, write_summary)
from loratune.train.distributed import (DistInfo, RankShare, check_objective,
                                        check_parallel_options)
from loratune.train.runtime import OneProcess, process_group
from loratune.train.schedule import lr_factor


def train_grpo(cfg: RunConfig, resume: bool = False, overwrite: bool = False, model=None,
               tokenizer=None, quiet: bool = False, skip_corrupt: bool = False) -> TrainResult:
    info = DistInfo.from_env()
    check_objective("grpo", cfg.train.parallel, info.world_size)  # a hand-started torchrun
    mode = check_parallel_options(cfg.train, cfg.adapter.method, info)
    rewards = load_rewards(cfg.train.rl.rewards)          # a bad reference fails before loading
    if wanted(cfg.data):
        raise ConfigError("data.add_tokens/add_special_tokens: train.objective grpo does not "
                          "grow the vocabulary; add the tokens in an SFT run first and start "
                          "GRPO from its merged model")
    init = init_spec(getattr(cfg.adapter, "init_lora_weights", None))
    if init is not None and init.hooks is not None:    # fitted to the run's own batches (EVA)
        raise ConfigError(f"adapter.init_lora_weights: {init.name} is fitted to SFT batches' "
                          "activations; train.objective grpo has only prompts (a few tokens "
                          "each, too few for its fit to settle): use another init, or start "
                          f"GRPO from an SFT run's {init.name} adapter")
    check_run_dir(Path(cfg.output_dir), resume, overwrite)  # fail before the slow setup
    seed_everything(cfg.train.seed)
    model, tokenizer = load_base(cfg, info, model, tokenizer)
    with process_group(info, mode, device_of(model), cfg.train.dist_timeout) as runtime:
        return run_grpo(cfg, runtime, model, tokenizer, rewards, resume, overwrite,
                        quiet or not runtime.is_main, skip_corrupt)


def run_grpo(cfg: RunConfig, runtime: OneProcess, model, tokenizer, rewards, resume: bool,
             overwrite: bool, quiet: bool, skip_corrupt: bool) -> TrainResult:
    log, main = (lambda *a: None) if quiet else print, runtime.is_main
    share = RankShare(runtime.info, runtime.device)
    out = Path(cfg.output_dir)
    if main:
        prepare_run_dir(out, resume, overwrite)
    runtime.barrier()
    train_rows, held_rows = read_prompts(cfg, tokenizer, log)
    per_step = cfg.train.batch_size * cfg.train.grad_accum // cfg.train.rl.num_generations
    total = total_steps(cfg, len(train_rows), per_step)
    hooks = setup_adapter(cfg, model, tokenizer, total, share)
    optimizer = build_optimizer(model, cfg.train)
    start = resume_from(cfg, out, model, optimizer, hooks, total, skip_corrupt, log,
                        runtime) if resume else 0
    metrics = MetricsLog(out / "metrics.jsonl", enabled=main)
    if main:
        write_config(out, cfg)
        metrics.truncate_after(start)
        MetricsLog(out / "completions.jsonl").truncate_after(start)  # a killed step's samples
    log(f"grpo: {len(train_rows)} prompts, {per_step} per step x {cfg.train.rl.num_generations} "
        f"completions, {total} steps, loss {cfg.train.rl.loss}")
    eos = eos_ids(model, tokenizer)
    held_rows = held_rows if main else []   # rank 0 alone scores the held-out prompts
    if held_rows and start == 0:  # the held-out score before any update: the run's baseline
        metrics.write({"step": 0, "eval_reward": heldout_reward(model, tokenizer, held_rows,
                                                                rewards, cfg, eos)})
    began, history = time.perf_counter(), []
    for step in range(start, total):
        prompts = rank_prompts(step_prompts(train_rows, per_step, cfg.train.seed, step),
                               cfg, runtime)
        record, scored = grpo_step(model, tokenizer, prompts, rewards, cfg.train, eos, step,
                                   optimizer, lambda k: set_lr(optimizer, schedule(cfg, total, k)),
                                   hooks, share)
        record = {"step": step + 1, **record}
        if held_rows and cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0:
            record["eval_reward"] = heldout_reward(model, tokenizer, held_rows, rewards, cfg, eos)
        metrics.write(record)
        history.append(record)
        if main:
            texts = [text_prompt(p) for p in prompts for _ in range(cfg.train.rl.num_generations)]
            append_samples(out, sample_lines(scored, texts, step + 1,
                                             cfg.train.rl.samples_logged,
                                             [r.name for r in rewards]))
        log(progress_line(record, total))
        if cfg.train.save_every and (step + 1) % cfg.train.save_every == 0:
            if main:
                save_checkpoint(out / "checkpoints", step + 1, model, optimizer,
                                resume_state(cfg, total), keep=cfg.train.save_total_limit,
                                hooks=hooks)
            runtime.barrier()
    seconds = time.perf_counter() - began
    result = finish(cfg, out, model, tokenizer, held_rows, rewards, eos, total, history,
                    seconds) if main else None
    runtime.barrier()   # the adapter is written before any rank returns
    final = history[-1]["loss"] if history else float("nan")
    return result or TrainResult(out, out / "adapter", total, final, None, seconds, 0, 0, history)


def setup_adapter(cfg: RunConfig, model, tokenizer, total: int, share: RankShare):
    """Add the adapter and its method's hooks (MoE-LoRA, AdaLoRA: counted in optimizer
    updates), before the optimizer exists; returns the hooks."""
    start_adapter(cfg, model, tokenizer)
    hooks = method_hooks(model, cfg.adapter, "default", total * cfg.train.rl.num_iterations)
    share.broadcast([p for p in model.parameters() if p.requires_grad])  # one adapter for all
    set_checkpointing(model, cfg.train.gradient_checkpointing)  # the update recomputes layers
    model.train()
    return hooks


def rank_prompts(prompts: list[Prompt], cfg: RunConfig, runtime: OneProcess) -> list[Prompt]:
    """This rank's prompts of the step: its micro-batches (whole groups), in order."""
    per_micro = cfg.train.batch_size // cfg.train.rl.num_generations
    return [p for k in runtime.micro_batches(cfg.train.grad_accum)
            for p in prompts[k * per_micro:(k + 1) * per_micro]]

# ---------------------------------------------------------------------------------- data


def read_prompts(cfg: RunConfig, tokenizer,
                 log=lambda *a: None) -> tuple[list[Prompt], list[Prompt]]:
    """(training prompts, held-out prompts): data.eval, else a data.eval_fraction split; a list
    of sources is mixed (data/mixture.py), held-out sources are read whole, one after another."""
    train_path, held_path = resolve_data_paths(cfg)

    def prompts(path: str) -> list[Prompt]:
        return [encode_prompt(r, f"{path}:{n}", tokenizer) for n, r in read_indexed(path)]

    rows, record = read_sources(train_path, cfg.train.seed, prompts, lambda p: len(p.ids))
    if record:
        log(mixture_line(record))
    held = [p for s in as_sources(held_path) for p in prompts(s.path)] if held_path else []
    if not held and cfg.data.eval_fraction:
        order = list(range(len(rows)))
        random.Random(cfg.train.seed).shuffle(order)
        cut = max(1, int(len(rows) * cfg.data.eval_fraction))
        held, rows = [rows[i] for i in order[:cut]], [rows[i] for i in order[cut:]]
    if not rows:
        raise ConfigError(f"data.train: {train_path} has no prompts")
    return rows, held


def encode_prompt(record: dict, where: str, tokenizer) -> Prompt:
    prompt = record.get("prompt") if isinstance(record, dict) else None
    if isinstance(prompt, str) and prompt:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    else:
        raise ConfigError(f"{where}: expected a 'prompt' (a non-empty string or a list of "
                          "{role, content} messages) for train.objective grpo")
    columns = {k: v for k, v in record.items() if k != "prompt"}
    return Prompt(prompt, list(ids), columns)


def text_prompt(p: Prompt) -> str:
    return p.prompt if isinstance(p.prompt, str) else p.prompt[-1].get("content", "")


def step_prompts(rows: list[Prompt], n: int, seed: int, step: int) -> list[Prompt]:
    """The step's prompts: consecutive slices of a per-epoch shuffle (seed, epoch)."""
    out, at = [], step * n
    while len(out) < n:
        epoch, i = divmod(at, len(rows))
        order = list(range(len(rows)))
        random.Random(seed * 7919 + epoch).shuffle(order)
        out.append(rows[order[i]])
        at += 1
    return out


def total_steps(cfg: RunConfig, n_rows: int, per_step: int) -> int:
    if cfg.train.max_steps:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * n_rows / per_step))


def schedule(cfg: RunConfig, total: int, update: int) -> float:
    updates = total * cfg.train.rl.num_iterations
    return lr_factor(update, updates, int(cfg.train.warmup_ratio * updates), cfg.train.schedule)


# ------------------------------------------------------------------------- resume, eval


def resume_from(cfg: RunConfig, out: Path, model, optimizer, hooks, total: int,
                skip_corrupt: bool, log, runtime: OneProcess) -> int:
    ckpts = list_checkpoints(out / "checkpoints")
    chosen = choose_checkpoint(ckpts, skip_corrupt, log) if ckpts else None
    path = runtime.agree_on_checkpoint(chosen, out / "checkpoints")  # rank 0's, on every rank
    if path is None:
        log("resume: no checkpoint yet, starting at step 0")
        return 0
    check_method_resumes(cfg)
    meta = load_checkpoint(path, model, optimizer, hooks=hooks)  # AdaLoRA's averages too
    check_resume_state(meta, cfg, path)
    log(f"resumed from {path.name}")
    return int(meta["step"])


@torch.no_grad()
def heldout_reward(model, tokenizer, rows: list[Prompt], rewards, cfg: RunConfig,
                   eos: set[int]) -> float:
    """Mean of the first reward over greedy completions of the held-out prompts."""
    params = SamplingParams(max_tokens=cfg.train.rl.max_completion_length, temperature=0.0)
    got = []
    for i in range(0, len(rows), cfg.eval.batch_size):
        part = rows[i:i + cfg.eval.batch_size]
        ids = rollout(model, [p.ids for p in part], eos, params, cfg.train.seed, 0)
        texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
        shown = [[{"role": "assistant", "content": t}] if isinstance(p.prompt, list) else t
                 for p, t in zip(part, texts)]
        columns = {k: [p.columns.get(k) for p in part] for k in part[0].columns}
        got.append(score(rewards[:1], [p.prompt for p in part], shown,
                         {**columns, "completion_ids": ids})[:, 0])
    values = torch.cat(got)
    return float(torch.nanmean(values))


# ----------------------------------------------------------------------------- output


def append_samples(out: Path, lines: list[dict]) -> None:
    with (out / "completions.jsonl").open("a", encoding="utf-8") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)


def progress_line(record: dict, total: int) -> str:
    return (f"step {record['step']}/{total} loss {record['loss']:.4f} reward "
            f"{record['reward'] if record['reward'] is not None else float('nan'):.3f} "
            f"kl {record['kl']:.4f} len {record['completion_length']:.1f} rollout "
            f"{record['rollout_seconds']:.1f}s update {record['update_seconds']:.1f}s")


def finish(cfg: RunConfig, out: Path, model, tokenizer, held_rows, rewards, eos, total: int,
           history: list[dict], seconds: float) -> TrainResult:
    adapter_dir = save_adapter(model, out / "adapter", overwrite=True)
    final = history[-1]["loss"] if history else float("nan")
    summary = {"objective": "grpo", "loss": cfg.train.rl.loss, "steps": total,
               "seconds": round(seconds, 2), "final_loss": final}
    if held_rows:  # the last step's held-out score when it has one (same weights)
        last = history[-1] if history else {}
        summary["eval_reward"] = last["eval_reward"] if "eval_reward" in last else \
            heldout_reward(model, tokenizer, held_rows, rewards, cfg, eos)
    write_summary(out, summary)
    plot_loss(out / "metrics.jsonl", out / "loss.png")
    return TrainResult(out, adapter_dir, total, final, summary.get("eval_reward"), seconds,
                       0, 0, history)
