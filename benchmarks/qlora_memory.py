#!/usr/bin/env python3
"""QLoRA memory: one training step on a Llama-2-7B-shaped (or 13B) model with a 4-bit base.

The model is random-initialized with the real architecture and built layer by layer straight
into NF4 (double quant), so nothing full-size is ever materialized. LoRA r=16 on all linear
layers, activation checkpointing, AdamW. Prints the 4-bit size, peak RSS during load and
during the step (the kernel's high-water mark, reset between phases), and seconds per step.
Each model runs in its own process.

    python benchmarks/qlora_memory.py                 # 7b, batch 1 x 256
    python benchmarks/qlora_memory.py --shape llama-2-13b --batch 2 --seq 512
    python benchmarks/qlora_memory.py --shape small   # SmolLM2-135M: 4-bit vs fp32 base

Targets (seeds: 5.8 GB for 7B on an 8 GB GPU): 7B <= 6 GiB, 13B <= 10 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch


def rss_gib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def measured_steps(model, batch: int, seq: int, steps: int, chunk: int) -> tuple[float, list]:
    """Train `model` (its adapter added) `steps` AdamW steps on random tokens with gradient
    checkpointing, from a reset peak: (RSS before the first step in GiB, each step's seconds).
    VmHWM afterwards is the steps' peak."""
    from loratune.config import TrainConfig
    from loratune.train.loop import set_checkpointing
    from loratune.train.loss import causal_lm_loss
    from loratune.train.optim import build_optimizer

    set_checkpointing(model, True)
    model.train()
    opt = build_optimizer(model, TrainConfig(lr=1e-4))
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    data = {"input_ids": ids, "labels": ids.clone()}
    after_load = rss_gib("VmRSS")
    reset_peak()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        total, n = causal_lm_loss(model, data, chunk=chunk)
        (total / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return after_load, times


def reset_peak() -> None:
    # Writing 5 to clear_refs resets VmHWM (peak RSS) to the current RSS (Linux >= 4.0).
    with open(f"/proc/{os.getpid()}/clear_refs", "w") as f:
        f.write("5")


def build(shape: str, fp32: bool):
    from loratune.config import ModelConfig, QuantConfig
    from loratune.models import load_model
    from loratune.models.load_4bit import random_quantized

    if shape == "small":
        cfg = ModelConfig(quantization=None if fp32 else QuantConfig())
        return load_model(cfg)[0]
    return random_quantized(shape, QuantConfig())


def worker(args) -> dict:
    from loratune.adapters import add_adapter, trainable_report
    from loratune.config import LoraConfig
    from loratune.models.quantize import quantized_bytes

    from loratune.train.host_memory import use_mmap_for_large_blocks

    if args.host_memory == "low":  # what `loratune train` does for QLoRA (train.host_memory)
        use_mmap_for_large_blocks()
    torch.manual_seed(0)
    reset_peak()
    t0 = time.perf_counter()
    model = build(args.shape, args.fp32)
    load_s, load_peak = time.perf_counter() - t0, rss_gib("VmHWM")
    add_adapter(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    after_load, times = measured_steps(model, args.batch, args.seq, args.steps, chunk=256)
    return {"shape": args.shape, "base": "fp32" if args.fp32 else "nf4",
            "quantized_gib": quantized_bytes(model) / 2**30, "load_s": load_s,
            "load_peak_gib": load_peak, "rss_after_load_gib": after_load,
            "step_peak_gib": rss_gib("VmHWM"), "s_per_step": min(times),
            "trainable": trainable_report(model)[2], "batch": args.batch, "seq": args.seq,
            "host_memory": args.host_memory}


def planned_gib(args, fp32: bool) -> float:
    """The planner's estimate for this very step (CPU, fp32 activations, chunk 256)."""
    from loratune.plan import PRESETS, Setup, estimate

    name = "smollm2-135m-instruct" if args.shape == "small" else args.shape
    setup = Setup(method="lora" if fp32 else "qlora", batch=args.batch, seq=args.seq,
                  dtype="fp32", checkpointing=True, loss_chunk=256, device="cpu")
    return estimate(PRESETS[name], setup).total / 2**30


def spawn(args, fp32: bool) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--shape", args.shape, "--batch", str(args.batch),
           "--seq", str(args.seq), "--steps", str(args.steps), "--host-memory", args.host_memory] + (["--fp32"] if fp32 else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"worker failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["planned_gib"] = planned_gib(args, fp32)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="llama-2-7b",
                   help="llama-2-7b | llama-2-13b | llama-2-70b | small")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--host-memory", default="low", choices=["low", "fast"],
                   help="low: large blocks from mmap (as loratune train does for QLoRA)")
    p.add_argument("--fp32", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    runs = [spawn(args, fp32=False)]
    if args.shape == "small":  # the fp32 base fits only for the small model on this machine
        runs.append(spawn(args, fp32=True))
    print(f"QLoRA step, {args.shape}, batch {args.batch} x {args.seq}, LoRA r=16 all-linear, "
          f"activation checkpointing, host memory {args.host_memory}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"{'base':<6}{'4-bit GiB':>10}{'load s':>8}{'load peak':>11}{'after load':>11}"
          f"{'step peak':>11}{'planned':>9}{'plan/peak':>10}{'s/step':>9}")
    for r in runs:
        print(f"{r['base']:<6}{r['quantized_gib']:>10.2f}{r['load_s']:>8.0f}"
              f"{r['load_peak_gib']:>11.2f}{r['rss_after_load_gib']:>11.2f}"
              f"{r['step_peak_gib']:>11.2f}{r['planned_gib']:>9.2f}"
              f"{r['planned_gib'] / r['step_peak_gib']:>10.2f}{r['s_per_step']:>9.1f}")
    print(runs[0]["trainable"])
    if len(runs) == 2:
        print(f"peak RSS, 4-bit / fp32 base: {runs[0]['step_peak_gib'] / runs[1]['step_peak_gib']:.2f}")
    target = {"llama-2-7b": 6, "llama-2-13b": 10}.get(args.shape)
    if target:
        print(f"target: step peak <= {target} GiB")


if __name__ == "__main__":
    main()
