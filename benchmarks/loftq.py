#!/usr/bin/env python3
"""LoftQ against plain QLoRA on the demo task: held-out loss after N/2 and N steps.

Both arms hold the same NF4 layout (blocksize 64, no double quantization, as PEFT's LoftQ):
QLoRA quantizes W and starts LoRA at B = 0; LoftQ quantizes W − s·B·A with B·A fitted to the
quantization error (init_lora_weights: loftq). Both 4-bit bases are kept as dequantized fp32
values (numerically what a 4-bit layer computes, tested in tests/adapters/test_base_inits.py;
a CPU Linear4bit dequantizes every weight on every forward, which made this script take hours
here), and the full-precision model's held-out loss is printed as the floor both chase.

    python benchmarks/loftq.py                    # embedded SmolLM2-135M, 30 steps
    python benchmarks/loftq.py --steps 5 --limit 16
    # the starting points only (one step at lr 1e-12), what a loaded 2-core CPU affords:
    python benchmarks/loftq.py --steps 1 --lr 1e-12 --limit 8 --batch 2 --max-length 64 \
        --arms qlora,loftq
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from loratune.adapters.loftq import nf4_round_trip  # noqa: E402
from loratune.config import build_config  # noqa: E402
from loratune.models import load_model  # noqa: E402
from loratune.models.modules import output_layer_names  # noqa: E402
from loratune.train import train  # noqa: E402


def round_trip_linears(model) -> None:
    """Every linear layer but the output layer (quantize_model's choice) holds NF4(W), in the
    layout LoftQ uses (adapters/loftq.py), as fp32 values."""
    skip = output_layer_names(model)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name not in skip:
                module.weight.copy_(nf4_round_trip(module.weight.float()))


def run(arm: str, steps: int, args) -> dict:
    model, tokenizer = load_model("smollm2-135m-instruct")
    if arm == "qlora":
        round_trip_linears(model)
    adapter = {"r": args.r, "lora_alpha": args.alpha, "target_modules": "all-linear"}
    if arm == "loftq":
        adapter.update(init_lora_weights="loftq", loftq_config={"loftq_iter": args.iters})
    with tempfile.TemporaryDirectory() as tmp:
        cfg = build_config({
            "output_dir": str(Path(tmp) / arm), "adapter": adapter,
            "data": {"train": "demo", "eval": "demo", "max_length": args.max_length},
            "train": {"max_steps": steps, "batch_size": args.batch, "lr": args.lr, "seed": 0,
                      "warmup_ratio": 0.0, "eval_every": steps // 2 or None},  # and the end
            "eval": {"limit": args.limit},
        })
        result = train(cfg, model=model, tokenizer=tokenizer, quiet=True)
    evals = {h["step"]: h["eval_loss"] for h in result.history if "eval_loss" in h}
    return {"arm": arm, "eval_loss_by_step": {**evals, steps: result.eval_loss},
            "train_loss": result.final_loss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--limit", type=int, default=32, help="held-out examples")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--iters", type=int, default=1, help="loftq_iter")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--arms", default="qlora,loftq,full_precision")
    args = ap.parse_args()
    torch.manual_seed(0)
    for arm in args.arms.split(","):
        print(json.dumps(run(arm, args.steps, args)), flush=True)


if __name__ == "__main__":
    main()
