#!/usr/bin/env python3
"""GRPO step speed and memory: loratune vs TRL's GRPOTrainer, same model, same prompts, one run.

SmolLM2-135M-Instruct in fp32 (loratune's embedded copy; TRL is handed the same transformers
model object that loratune's loader returns, wrapped by PEFT), LoRA r=16 alpha=32 on
q/k/v/o_proj, AdamW lr 1e-4 without weight decay, grad norm clipped at 1, loss `dapo`, beta 0,
one iteration per rollout. A step takes `--prompts` prompts of the bundled arithmetic task
(examples/grpo_arithmetic, the same rows in the same order on both sides), samples `--group`
completions of each at temperature 1 with EOS suppressed, so every completion is exactly
`--length` tokens on both sides (the same work), scores them with one TRL-signature reward
(the numeric answer check), and makes one optimizer step over all of them (one micro-batch).

loratune: `train/rl_step.grpo_step`, the step the recipe runs (rollouts on the serving
engine's slot-cache batch on the live model). TRL: `GRPOTrainer.train()`, its default
generation path (`use_vllm=False`: `model.generate` on the PEFT model). A step's rollout time is
TRL's `_generate_and_score_completions` (generation + reward + advantages), its update time the
rest of the step (loss, backward, optimizer). Each side runs in its own process, so its peak
RSS (`ru_maxrss`) is its own.

    python benchmarks/grpo_speed.py            # 2 prompts x 8 completions x 32 tokens, 3 steps
    python benchmarks/grpo_speed.py --quick    # smoke run: 1 prompt x 4 x 8 tokens, 1 step

Prints, per side: s/step split into rollout and update (medians of the measured steps, after
one warm-up step), rollout tokens/s, peak RSS; then loratune / TRL ratios (goal: step time
<= 0.5x, peak RSS <= 0.8x).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from process_memory import peak_rss_gib, worker_result

MODEL = "smollm2-135m-instruct"
DATA = Path(__file__).resolve().parents[1] / "examples" / "grpo_arithmetic" / "train.jsonl"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
LR = 1e-4


@dataclass
class Result:
    name: str
    step_s: float
    rollout_s: float
    update_s: float
    tokens_per_s: float   # completion tokens sampled per second of rollout
    peak_rss_gib: float
    steps: int


def rows(n_prompts: int, steps: int) -> list[dict]:
    """The first prompts of the arithmetic task, as many as the run's steps take."""
    lines = DATA.read_text().splitlines()[:n_prompts * steps]
    return [json.loads(x) for x in lines]


def answer_reward():
    """One TRL-signature reward for both sides: the last number of the reply == the answer."""
    from loratune.train.rl_rewards import numeric

    return numeric("answer", 1e-6)


def run_loratune(model, tok, args) -> list[tuple[float, float]]:
    from loratune.adapters import add_adapter
    from loratune.config import LoraConfig, TrainConfig
    from loratune.recipes.grpo import encode_prompt
    from loratune.train.optim import build_optimizer
    from loratune.train.rl_rewards import Reward
    from loratune.train.rl_step import grpo_step

    add_adapter(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    n = args.prompts * args.group
    cfg = TrainConfig(objective="grpo", lr=LR, batch_size=n, grad_accum=1, max_grad_norm=1.0,
                      rl={"loss": "dapo", "num_generations": args.group, "temperature": 1.0,
                          "max_completion_length": args.length,
                          "rewards": [{"function": "numeric", "column": "answer"}]})
    opt = build_optimizer(model, cfg)
    if args.checkpointing:
        from loratune.train.loop import set_checkpointing

        set_checkpointing(model, True)   # what train.gradient_checkpointing sets
    prompts = [encode_prompt(r, f"{DATA}:{i}", tok) for i, r in enumerate(rows(args.prompts,
                                                                            args.steps + 1))]
    rewards = [Reward("numeric", answer_reward(), 1.0)]
    model.train()
    times = []
    for step in range(args.steps + 1):
        part = prompts[step * args.prompts:(step + 1) * args.prompts]
        # eos=set(): no row stops early, every completion is --length tokens (as TRL's
        # min_new_tokens)
        record, _ = grpo_step(model, tok, part, rewards, cfg, set(), step, opt, lambda k: None)
        times.append((record["rollout_seconds"], record["update_seconds"]))
    return times


def run_trl(model, tok, args, tmp: str) -> list[tuple[float, float]]:
    import datasets
    import peft
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    model = peft.get_peft_model(model, peft.LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"))
    cfg = GRPOConfig(output_dir=tmp, report_to="none", use_cpu=True, bf16=False,
                     per_device_train_batch_size=args.prompts * args.group,
                     num_generations=args.group, max_completion_length=args.length,
                     temperature=1.0, beta=0.0, loss_type="dapo", num_iterations=1,
                     gradient_accumulation_steps=1, learning_rate=LR, weight_decay=0.0,
                     lr_scheduler_type="constant", max_grad_norm=1.0, logging_steps=10**6,
                     save_strategy="no", max_steps=args.steps + 1, use_vllm=False,
                     shuffle_dataset=False, dataloader_num_workers=0, seed=0,
                     generation_kwargs={"min_new_tokens": args.length},
                     gradient_checkpointing=args.checkpointing,
                     gradient_checkpointing_kwargs={"use_reentrant": False})
    data = datasets.Dataset.from_list(rows(args.prompts, args.steps + 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(model=model, reward_funcs=answer_reward(), args=cfg,
                              train_dataset=data, processing_class=tok)
    rollout, marks = [], []
    generate = trainer._generate_and_score_completions

    def timed_generate(inputs):
        t0 = time.perf_counter()
        out = generate(inputs)
        rollout.append(time.perf_counter() - t0)
        return out

    class StepClock(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            marks.append(time.perf_counter())

        def on_step_end(self, *a, **kw):
            marks[-1] = time.perf_counter() - marks[-1]

    trainer._generate_and_score_completions = timed_generate
    trainer.add_callback(StepClock())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return [(r, s - r) for r, s in zip(rollout, marks)]


def run_worker(args) -> Result:
    import tempfile

    from loratune.models import load_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok = load_model(MODEL)
    with tempfile.TemporaryDirectory() as tmp:
        times = run_trl(model, tok, args, tmp) if args.worker == "trl" else \
            run_loratune(model, tok, args)
    if len(times) != args.steps + 1:
        raise SystemExit(f"{args.worker}: timed {len(times)} steps, expected {args.steps + 1}")
    measured = times[1:]  # the first step warms up (allocations, lazy imports)
    roll = statistics.median(t[0] for t in measured)
    upd = statistics.median(t[1] for t in measured)
    step = statistics.median(t[0] + t[1] for t in measured)
    tokens = args.prompts * args.group * args.length
    return Result(args.worker, step, roll, upd, tokens / roll, peak_rss_gib(), args.steps)


def spawn(worker: str, args) -> Result:
    cmd = [sys.executable, __file__, "--worker", worker, "--prompts", str(args.prompts),
           "--group", str(args.group), "--length", str(args.length), "--steps", str(args.steps),
           "--threads", str(args.threads)] + ["--checkpointing"] * args.checkpointing
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    return Result(**worker_result(cmd, worker, env))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--prompts", type=int, default=2, help="prompts per step")
    p.add_argument("--group", type=int, default=8, help="completions per prompt")
    p.add_argument("--length", type=int, default=32, help="tokens per completion")
    p.add_argument("--steps", type=int, default=3, help="measured steps after one warm-up")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per side (1: a shared machine's spinning OpenMP "
                        "threads cost more than they give)")
    p.add_argument("--checkpointing", action="store_true",
                   help="activation checkpointing in the update, both sides")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 prompt x 4 x 8, 1 step")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(asdict(run_worker(args))))
        return
    if args.quick:
        args.prompts, args.group, args.length, args.steps = 1, 4, 8, 1
    print(f"torch {torch.__version__}, {args.threads} thread(s) per side; model {MODEL} fp32; "
          f"LoRA r=16 q/k/v/o; {args.prompts} prompts x {args.group} completions x "
          f"{args.length} tokens per step; {args.steps} measured steps after 1 warm-up"
          f"{'; activation checkpointing' if args.checkpointing else ''}")
    results = [spawn(w, args) for w in ("trl", "loratune")]
    base = results[0]
    print(f"{'config':<10}{'s/step':>9}{'rollout s':>11}{'update s':>10}{'tok/s':>8}"
          f"{'peak GiB':>10}{'time x':>8}{'rollout x':>11}{'update x':>10}{'RSS x':>7}")
    for r in results:
        print(f"{r.name:<10}{r.step_s:>9.2f}{r.rollout_s:>11.2f}{r.update_s:>10.2f}"
              f"{r.tokens_per_s:>8.1f}{r.peak_rss_gib:>10.2f}{r.step_s / base.step_s:>8.2f}"
              f"{r.rollout_s / base.rollout_s:>11.2f}{r.update_s / base.update_s:>10.2f}"
              f"{r.peak_rss_gib / base.peak_rss_gib:>7.2f}")
    print("x: loratune / TRL (below 1: loratune faster / smaller). Goal: time x <= 0.5, "
          "RSS x <= 0.8.")


if __name__ == "__main__":
    main()
