#!/usr/bin/env python3
"""Training-step speed and memory: loratune vs PEFT (+ a plain hand-written loop), one run.

Same model (SmolLM2-135M-Instruct, fp32), same batch, LoRA r=16 alpha=32 on all linear layers,
AdamW. Each configuration runs in its own process so that its peak RSS is its own.

    python benchmarks/train_speed.py            # full run (~10 min on 2 cores)
    python benchmarks/train_speed.py --quick    # smoke run

Prints s/step, tokens/s (all and useful = labelled-or-not, non-pad), peak RSS, and ratios.
Targets: step time <= 0.6x PEFT, peak RSS <= 0.5x PEFT, packed useful tokens/s >= 2.5x PEFT.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

from process_memory import peak_rss_gib, rss_now_gib

MODEL = "smollm2-135m-instruct"
WORDS = "alpha beta gamma delta river stone cloud green metal piano tiger lemon candle".split()


@dataclass
class Result:
    name: str
    s_per_step: float
    tokens_per_s: float
    useful_tokens_per_s: float
    peak_rss_gib: float
    rss_after_load_gib: float
    steps: int


def sft_examples(tokenizer, n: int, seed: int, variable: bool, max_length: int = 256):
    """Chat samples with answer-only labels; variable=True spreads lengths ~20-250 tokens."""
    from loratune.data import encode_conversation, read_records, resolve_template, to_messages
    from loratune.demo import demo_train_path

    rng = random.Random(seed)
    template = resolve_template(tokenizer, None)
    records = read_records(demo_train_path())
    out = []
    for i in range(n):
        messages = to_messages(records[i % len(records)], "alpaca")
        if variable:
            messages[-1]["content"] = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 190)))
        ex, _ = encode_conversation(messages, tokenizer, template, "answers", max_length)
        out.append(ex)
    return out


def fixed_batch(tokenizer, batch: int, seq: int, labels: str) -> dict[str, torch.Tensor]:
    """`batch` rows of exactly `seq` tokens of packed SFT samples (position ids restart)."""
    from loratune.data import collate, pack_examples

    # truncated to the row length: a packed row must hold at least one whole sample
    examples = sft_examples(tokenizer, batch * seq // 40, seed=0, variable=False, max_length=seq)
    rows = [r for r in pack_examples(examples, seq)][:batch]
    out = collate(rows, tokenizer.pad_token_id, packed=True)
    pad = out["input_ids"].shape[1]
    if pad < seq:  # top up to exactly seq with padding that carries no loss
        extra = seq - pad
        out["input_ids"] = torch.nn.functional.pad(out["input_ids"], (0, extra),
                                                   value=tokenizer.pad_token_id)
        out["labels"] = torch.nn.functional.pad(out["labels"], (0, extra), value=-100)
        tail = torch.arange(extra).expand(batch, -1)
        out["position_ids"] = torch.cat([out["position_ids"], tail], dim=1)
    if labels == "all":
        out["labels"] = out["input_ids"].clone()
    return out


def setup(framework: str, checkpointing: bool):
    from loratune.models import load_model

    model, tok = load_model(MODEL)
    if framework == "peft":
        import peft

        cfg = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                              task_type="CAUSAL_LM")
        model = peft.get_peft_model(model, cfg)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(batch):
            loss = model(**batch, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss)
    else:
        from loratune.adapters import add_adapter
        from loratune.config import LoraConfig, TrainConfig
        from loratune.train.loop import set_checkpointing
        from loratune.train.loss import causal_lm_loss
        from loratune.train.optim import build_optimizer

        add_adapter(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        if checkpointing:
            set_checkpointing(model, True)
        opt = build_optimizer(model, TrainConfig(lr=1e-4))

        def step(batch):
            total, n = causal_lm_loss(model, batch)
            (total / max(n, 1)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(total) / max(n, 1)
    model.train()
    return model, tok, step


def run_fixed(args) -> Result:
    framework, _, variant = args.worker.partition("+")
    model, tok, step = setup(framework, variant == "ckpt")
    loaded = rss_now_gib()
    batch = fixed_batch(tok, args.batch, args.seq, args.labels)
    useful = int((batch["input_ids"] != tok.pad_token_id).sum())
    step(batch)  # warm-up
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    return Result(args.worker, dt, batch["input_ids"].numel() / dt, useful / dt, peak_rss_gib(),
                  loaded, args.steps)


def run_variable(args) -> Result:
    """All samples once: PEFT with padded batches, loratune with packed rows."""
    from loratune.data import collate, pack_examples

    framework = args.worker.split(":")[1]
    model, tok, step = setup(framework, False)
    loaded = rss_now_gib()
    examples = sft_examples(tok, args.samples, seed=1, variable=True, max_length=args.seq)
    if framework == "peft":
        rows = [[ex] for ex in examples]
        batches = [collate(rows[i:i + args.batch], tok.pad_token_id, packed=False)
                   for i in range(0, len(rows), args.batch)]
    else:
        rows = pack_examples(examples, args.seq)
        batches = [collate(rows[i:i + args.batch], tok.pad_token_id, packed=True)
                   for i in range(0, len(rows), args.batch)]
    useful = sum(len(ex) for ex in examples)
    total = sum(b["input_ids"].numel() for b in batches)
    step(batches[0])  # warm-up, not timed
    t0 = time.perf_counter()
    for b in batches:
        step(b)
    dt = time.perf_counter() - t0
    return Result(args.worker, dt / len(batches), total / dt, useful / dt, peak_rss_gib(),
                  loaded, len(batches))


def spawn(worker: str, args) -> Result:
    cmd = [sys.executable, __file__, "--worker", worker, "--batch", str(args.batch), "--seq",
           str(args.seq), "--steps", str(args.steps), "--labels", args.labels, "--samples",
           str(args.samples)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"worker {worker} failed:\n{proc.stderr[-3000:]}")
    return Result(**json.loads(proc.stdout.strip().splitlines()[-1]))


def table(results: list[Result], base: Result, title: str) -> None:
    print(f"\n{title}")
    print(f"{'config':<22}{'s/step':>9}{'tok/s':>9}{'useful/s':>10}{'peak GiB':>10}"
          f"{'load GiB':>10}{'time x':>8}{'RSS x':>7}")
    for r in results:
        print(f"{r.name:<22}{r.s_per_step:>9.2f}{r.tokens_per_s:>9.0f}"
              f"{r.useful_tokens_per_s:>10.0f}{r.peak_rss_gib:>10.2f}{r.rss_after_load_gib:>10.2f}"
              f"{r.s_per_step / base.s_per_step:>8.2f}{r.peak_rss_gib / base.peak_rss_gib:>7.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="measured steps after one warm-up")
    p.add_argument("--labels", choices=["answers", "all"], default="answers")
    p.add_argument("--samples", type=int, default=64, help="variable-length run size")
    p.add_argument("--quick", action="store_true", help="tiny smoke run")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        run = run_variable if args.worker.startswith("var:") else run_fixed
        print(json.dumps(asdict(run(args))))
        return
    if args.quick:
        args.batch, args.seq, args.steps, args.samples = 2, 64, 1, 8
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model {MODEL} fp32; "
          f"LoRA r=16 alpha=32 all-linear; batch {args.batch}x{args.seq}")
    for labels in ("answers", "all") if not args.quick else ("answers",):
        args.labels = labels
        results = [spawn(w, args) for w in ("peft", "loratune", "loratune+ckpt")]
        table(results, results[0], f"fixed batch, labels on {labels} (ratios vs PEFT)")
    print("targets: loratune time x <= 0.60, RSS x <= 0.50")
    var = [spawn(w, args) for w in ("var:peft", "var:loratune")]
    table(var, var[0], f"variable lengths, {args.samples} samples: PEFT padded vs loratune packed")
    ratio = var[1].useful_tokens_per_s / var[0].useful_tokens_per_s
    print(f"useful tokens/s, packed vs padded: {ratio:.2f}x (target >= 2.5x)")


if __name__ == "__main__":
    main()
