#!/usr/bin/env python3
"""The PEFT family side by side on the demo task: `loratune compare` with the embedded model.

Every method trains with the demo's data, steps, batch and schedule (examples/demo.yaml); only
the learning rate follows each method's usual range (scales and virtual tokens need larger
steps than low-rank updates). Each method runs in its own process (its own peak RSS).

    python benchmarks/methods.py                       # all eight methods (~1 h on 2 cores)
    python benchmarks/methods.py --methods lora,ia3    # a subset
    python benchmarks/methods.py --steps 10 --limit 8  # smoke run

Prints the table (also written as Markdown, PNG and JSON under --out) and checks the seeds'
claims: LoRA and DoRA within ~1 point; IA³ and prompt tuning lower, with far fewer parameters.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALL = "lora,dora,ia3,prompt,prefix,bottleneck,moe_lora,adalora"
# Learning rates in each method's customary range (PEFT's examples, the papers).
LRS = "ia3=1e-2,prompt=3e-2,prefix=1e-2,bottleneck=1e-3,moe_lora=1e-3,adalora=2e-3"


def claims(rows: list[dict]) -> list[str]:
    by = {r["method"]: r for r in rows}
    out = []
    if "lora" in by and "dora" in by:
        gap = abs(by["lora"]["score"] - by["dora"]["score"]) * 100
        out.append(f"LoRA vs DoRA: {gap:.1f} points apart "
                   f"({'within' if gap <= 1.0 else 'NOT within'} ~1 point)")
    for m in ("ia3", "prompt"):
        if m in by and "lora" in by:
            lower = by[m]["score"] < by["lora"]["score"]
            fewer = by["lora"]["trainable"] / max(by[m]["trainable"], 1)
            out.append(f"{m}: score {by[m]['score']:.1%} vs LoRA {by['lora']['score']:.1%} "
                       f"({'lower' if lower else 'NOT lower'}), {fewer:.0f}x fewer parameters")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default=ALL)
    ap.add_argument("--steps", type=int, default=None, help="override train.max_steps")
    ap.add_argument("--limit", type=int, default=None, help="score only the first N held-out")
    ap.add_argument("--out", default="runs/bench-methods")
    args = ap.parse_args()
    methods = args.methods.split(",")
    lrs = ",".join(i for i in LRS.split(",") if i.split("=")[0] in methods)
    overrides = [f"output_dir={args.out}/unused"]
    if args.steps:
        overrides.append(f"train.max_steps={args.steps}")
    if args.limit:
        overrides.append(f"eval.limit={args.limit}")
    cmd = [sys.executable, "-m", "loratune", "compare", str(ROOT / "examples" / "demo.yaml"),
           *overrides, "--methods", args.methods, "--out", args.out, "--quiet"]
    if lrs:
        cmd += ["--lr", lrs]
    code = subprocess.call(cmd)
    if code:
        return code
    rows = json.loads((Path(args.out) / "compare.json").read_text())
    print()
    for line in claims(rows):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
