"""Streamed training keeps memory flat: peak RSS of a few training steps on a small and on a big
alpaca corpus (data.streaming), and how fast a bad record near the big file's start is named.

Each run is its own process (peak RSS = its ru_maxrss): a tiny random Llama with the real
SmolLM2 tokenizer, so the data path, not the model, is what grows with the file. The corpora are
written under a temporary folder in /tmp and deleted at the end.

    .venv/bin/python benchmarks/stream_memory.py                 # 20 MB vs 2048 MB
    .venv/bin/python benchmarks/stream_memory.py --big-mb 200    # quicker
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB = 2**20
WORDS = ["apple", "river", "stone", "cloud", "green", "metal", "piano", "tiger", "lemon",
         "candle", "forest", "rocket", "amber", "delta", "ember", "frost"]

CHILD = r"""
import json, resource, sys, time
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from loratune.config import build_config
from loratune.data import DataError
from loratune.models import load_tokenizer
from loratune.train import train

path, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
tok = load_tokenizer("smollm2-135m-instruct")
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, max_position_embeddings=256))
cfg = build_config({"output_dir": out, "adapter": {"r": 4, "lora_alpha": 8},
                    "data": {"train": path, "max_length": 128, "streaming": True,
                             "shuffle_buffer": 2000},
                    "train": {"max_steps": steps, "batch_size": 4, "lr": 1e-3}})
t0, error = time.perf_counter(), None
try:
    train(cfg, model=model, tokenizer=tok, quiet=True)
except DataError as err:
    error = str(err)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"peak_rss_mib": round(peak, 1), "seconds": round(time.perf_counter() - t0, 2),
                  "error": error}))
"""


def write_corpus(path: Path, mb: float, bad_line2: bool = False) -> None:
    """An alpaca .jsonl of about `mb` MB (a block of distinct records repeated); `bad_line2`:
    line 2 is a record without its answer."""
    block = "".join(json.dumps({"instruction": f"Repeat the word {WORDS[i % 16]} {i} times",
                                "output": " ".join([WORDS[i % 16]] * (1 + i % 7))}) + "\n"
                    for i in range(4000)).encode()
    with path.open("wb") as f:
        if bad_line2:
            f.write(block[:block.index(b"\n") + 1] + b'{"instruction": "no answer"}\n')
        for _ in range(max(1, int(mb * MB // len(block)))):
            f.write(block)


def run(path: Path, out: Path, steps: int) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(path), str(out), str(steps)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small-mb", type=float, default=20)
    parser.add_argument("--big-mb", type=float, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="stream_memory_") as tmp:
        tmp = Path(tmp)
        rows = []
        for name, mb in (("small", args.small_mb), ("big", args.big_mb)):
            path = tmp / f"{name}.jsonl"
            t0 = time.perf_counter()
            write_corpus(path, mb)
            size = path.stat().st_size / MB
            print(f"wrote {path.name}: {size:,.0f} MB in {time.perf_counter() - t0:.0f} s",
                  flush=True)
            rows.append((name, size, run(path, tmp / f"run-{name}", args.steps)))
            path.unlink()
        bad = tmp / "bad.jsonl"
        write_corpus(bad, args.big_mb, bad_line2=True)
        rows.append(("big, bad line 2", bad.stat().st_size / MB, run(bad, tmp / "bad", 1)))
    print(f"\n{args.steps} steps, batch 4 x 128 tokens, data.shuffle_buffer=2000\n")
    print("| corpus | MB | peak RSS MiB | seconds | error |\n|---|---|---|---|---|")
    for name, size, r in rows:
        print(f"| {name} | {size:,.0f} | {r['peak_rss_mib']} | {r['seconds']} | "
              f"{(r['error'] or '')[-70:]} |")
    small, big = rows[0][2]["peak_rss_mib"], rows[1][2]["peak_rss_mib"]
    print(f"\nbig / small peak RSS: {big / small:.3f} (goal <= 1.10)")


if __name__ == "__main__":
    main()
