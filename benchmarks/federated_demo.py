"""The federated demo (issue 31): the bundled demo data split across 4 clients by language and
task (non-IID), and the held-out loss (data/heldout.jsonl: both languages, every task) of

- local-only: each client trains alone on its share for rounds × local_steps steps;
- federated: `loratune federate` (Flower simulation, ffa), the global adapter after each round;
- centralised: one run on the union for the federation's total steps (clients × rounds × steps).

Every figure is the same function (federated/held_out.py) on the same held-out file. Prints one
Markdown table; the federated run's folder holds metrics.jsonl for the dashboard (loratune ui).

    .venv/bin/python benchmarks/federated_demo.py --out runs/federated_demo

Measured with SmolLM2-135M at --rounds 3 --local-steps 4 (1183 s on the shared 2-core
machine): the table is in docs/federated.md. The defaults (4 rounds x 5 steps) take longer.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from loratune.adapters.peft_format import read_adapter_weights
from loratune.config import build_config
from loratune.data.bundled import DEMO_DIR as DATA_DIR
from loratune.federated.base import adapted_base
from loratune.federated.held_out import held_out_loss
from loratune.recipes.federate import run_federate
from loratune.train import train

CLIENTS = 4


def split(out: Path) -> list[Path]:
    """Client k: one language, half of the tasks (by the command's name)."""
    rows = [json.loads(line) for line in (DATA_DIR / "train.jsonl").read_text().splitlines()]
    tasks = sorted({r["output"].split("(")[0] for r in rows})
    half = set(tasks[: len(tasks) // 2])
    groups = [("en", True), ("en", False), ("zh", True), ("zh", False)]
    files = []
    for k, (lang, first) in enumerate(groups):
        mine = [r for r in rows
                if r["lang"] == lang and (r["output"].split("(")[0] in half) == first]
        path = out / "data" / f"client-{k}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in mine))
        files.append(path)
        print(f"client {k}: {lang}, tasks {sorted(half) if first else sorted(set(tasks) - half)}"
              f", {len(mine)} examples", flush=True)
    return files


def base_config(out: Path, name: str, model: str) -> dict:
    return {"output_dir": str(out / name), "model": {"name": model, "device": "cpu",
                                                     "dtype": "float32"},
            "adapter": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
            "data": {"train": str(DATA_DIR / "train.jsonl"),
                     "eval": str(DATA_DIR / "heldout.jsonl"), "max_length": 96},
            "train": {"batch_size": 4, "lr": 2e-3, "warmup_ratio": 0.0, "seed": 42}}


def plain(base: dict, name: str, data: Path, steps: int) -> float:
    out = Path(base["output_dir"]).parent
    cfg = build_config({**base, "output_dir": str(out / name),
                        "data": {**base["data"], "train": str(data)},
                        "train": {**base["train"], "max_steps": steps}})
    result = train(cfg, quiet=True)
    return held_out_loss(cfg, adapted_base(cfg), read_adapter_weights(result.adapter_dir))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/federated_demo")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=5)
    args = parser.parse_args()
    out, rounds_n, steps = Path(args.out), args.rounds, args.local_steps
    t0 = time.perf_counter()
    files = split(out)
    union = out / "data" / "union.jsonl"
    union.write_text("".join(f.read_text() for f in files))
    base = base_config(out, "federated", args.model)
    fed = build_config({**base, "federated": {
        "rounds": rounds_n, "clients": CLIENTS, "local_steps": steps, "aggregation": "ffa",
        "client_data": [str(f) for f in files]}})
    start = held_out_loss(fed, adapted_base(fed), adapted_base(fed).init)
    run_federate(fed, overwrite=True, quiet=True)
    log = (out / "federated" / "rounds.jsonl").read_text().splitlines()
    rounds = [json.loads(x) for x in log]
    local = [plain(base, f"local-{k}", f, rounds_n * steps) for k, f in enumerate(files)]
    central = plain(base, "centralised", union, CLIENTS * rounds_n * steps)
    print(f"\n{args.model}: {time.perf_counter() - t0:.0f} s in all\n")
    print("| setting | held-out loss |\n| --- | --- |")
    print(f"| no training (the base, adapter B = 0) | {start:.4f} |")
    print(f"| local-only, mean of 4 clients ({rounds_n * steps} steps each) | "
          f"{sum(local) / len(local):.4f} ({', '.join(f'{x:.3f}' for x in local)}) |")
    for r in rounds:
        print(f"| federated (ffa), round {r['round']} | {r['eval_loss']:.4f} |")
    print(f"| centralised on the union ({CLIENTS * rounds_n * steps} steps) | {central:.4f} |")


if __name__ == "__main__":
    main()
