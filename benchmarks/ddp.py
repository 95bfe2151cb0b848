#!/usr/bin/env python3
"""Data-parallel throughput: 1 process vs 2 processes (DDP, gloo) on the same global batch.

Every run trains the same LoRA (r=16, all linear layers) on the bundled demo data with the same
global step (train.batch_size x train.grad_accum rows) through loratune's `train()`, started
by torchrun. Reported: s/step and tokens/s after warm-up steps, and the cost of communication
per step: an all-reduce of all adapter gradients (what DDP sends each step) timed on its own.

    python benchmarks/ddp.py                 # small random Llama (hidden 256, 4 layers)
    python benchmarks/ddp.py --model smollm2 # the real SmolLM2-135M (slower)

On a machine with 2 cores, 2 processes cannot beat 1 process that already uses both cores:
expect no speedup. The figures say what DDP costs, not what it gains on real GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def small_llama(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=688,
                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                      max_position_embeddings=512, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def worker(args) -> None:
    """One rank: train, then time the gradient all-reduce alone; rank 0 writes the figures."""
    import torch.distributed as dist

    from loratune.config import build_config
    from loratune.models import load_model, load_tokenizer
    from loratune.train import train

    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = build_config({
        "output_dir": args.out, "model": {"name": "smollm2-135m-instruct"},
        "adapter": {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
        "data": {"train": "demo", "max_length": args.seq, "packing": False},
        "train": {"max_steps": args.steps, "batch_size": args.batch, "grad_accum": 2,
                  "warmup_ratio": 0.0, "save_every": None, "seed": 0},
    })
    if args.model == "smollm2":
        model, tok = load_model(cfg.model)
    else:
        tok = load_tokenizer("smollm2-135m-instruct")
        model = small_llama(len(tok))
    if world > 1:
        dist.init_process_group("gloo")
    result = train(cfg, model=model, tokenizer=tok, quiet=True, overwrite=True)
    timed = result.history[args.warmup:]
    seconds = sum(h["seconds"] for h in timed)
    comm_ms = 0.0
    grads = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if world > 1:  # what DDP's hook sends once per step: every adapter gradient, summed
        flat = torch.zeros(grads)
        for _ in range(3):
            dist.all_reduce(flat)
        t0 = time.perf_counter()
        for _ in range(20):
            dist.all_reduce(flat)
        comm_ms = (time.perf_counter() - t0) / 20 * 1000
    if int(os.environ.get("RANK", 0)) == 0:
        Path(args.report).write_text(json.dumps({
            "world": world, "threads": torch.get_num_threads(),
            "s_per_step": seconds / len(timed),
            "step_s_median": statistics.median(h["seconds"] for h in timed),
            "tokens_per_s": sum(h["tokens"] for h in timed) / seconds,
            "comm_ms": comm_ms, "grad_mib": grads * 4 / 2**20,
            "final_loss": result.final_loss}))
    if world > 1:
        dist.destroy_process_group()


def run(nproc: int, threads: int, args) -> dict:
    from loratune.train.distributed import torchrun_command

    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        target = [__file__, "--worker", "--out", str(Path(tmp) / "run"), "--report", str(report),
                  "--model", args.model, "--steps", str(args.steps), "--warmup",
                  str(args.warmup), "--batch", str(args.batch), "--seq", str(args.seq),
                  "--threads", str(threads)]
        done = subprocess.run(torchrun_command(nproc, target), capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{nproc} process(es) failed:\n{done.stderr[-3000:]}")
        return json.loads(report.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="small", choices=["small", "smollm2"])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=4, help="rows per micro-batch")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--report", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    cores = os.cpu_count()
    print(f"{args.model} model, global step = 2 micro-batches x {args.batch} rows, max_length "
          f"{args.seq}, {args.steps} steps ({args.warmup} warm-up), {cores} cores")
    runs = [("1 process, all cores", run(1, cores, args)),
            ("1 process, 1 thread", run(1, 1, args)),
            ("2 processes (DDP, gloo), 1 thread each", run(2, 1, args))]
    base = runs[0][1]["tokens_per_s"]
    for name, r in runs:
        comm = (f"; all-reduce of {r['grad_mib']:.2f} MiB adapter grads: {r['comm_ms']:.1f} ms "
                f"per step ({r['comm_ms'] / 10 / r['s_per_step']:.1f}% of the step)"
                if r["world"] > 1 else "")
        print(f"  {name:<40} {r['s_per_step']:.3f} s/step, {r['tokens_per_s']:8.0f} tokens/s "
              f"({r['tokens_per_s'] / base:.2f}x), loss {r['final_loss']:.4f}{comm}")


if __name__ == "__main__":
    main()
