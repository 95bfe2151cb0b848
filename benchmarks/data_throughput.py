"""Tokens/s of load + tokenize + pack for a raw-text corpus: loratune in memory, loratune
streaming, and `datasets.map` + TRL's `pack_dataset` (best-fit decreasing), with peak RSS.

The corpus is a .jsonl of {"text": ...} documents (a block of distinct documents repeated to
the size asked for), written in a temporary folder under /tmp and deleted at the end. Each
pipeline runs in its own process (peak RSS = its ru_maxrss, imports included), with the
SmolLM2 tokenizer and rows of --max-length tokens; every document ends with EOS in all three.
The seconds count the work alone: imports and the tokenizer's loading come before the clock.

- loratune in memory: build_examples (data.format: text), then one epoch's batches (first-fit
  decreasing over the whole file, collated into tensors), as `loratune train` does with
  data.streaming: false;
- loratune streaming: a BatchStream over one epoch (windows of data.shuffle_buffer documents
  packed, collated into batch tensors), as data.streaming: true trains;
- datasets + TRL: load_dataset("json") into an Arrow cache, map(tokenize, batched) and
  trl.pack_dataset(strategy="bfd"), as SFTTrainer(packing=True) prepares a dataset.

    .venv/bin/python benchmarks/data_throughput.py            # 1024 MB
    .venv/bin/python benchmarks/data_throughput.py --mb 50    # what fits a shared 2-core box
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB = 2**20
PIPELINES = ("loratune-memory", "loratune-streaming", "datasets+trl")


def write_corpus(path: Path, mb: float, seed: int = 0) -> None:
    """Documents of 40-400 words drawn from a 5,000-word vocabulary, one JSON line each."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(5000)]
    docs = [" ".join(rng.choices(vocab, k=rng.randint(40, 400))) + "." for _ in range(2000)]
    block = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    with path.open("wb") as f:
        for _ in range(max(1, round(mb * MB / len(block)))):
            f.write(block)


def _tokenizer():
    from loratune.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


# Each pipeline: imports and the tokenizer first (not timed), then a function doing the work.

def run_memory(path: str, max_length: int, tmp: str):
    from loratune.config import DataConfig
    from loratune.data import batches, build_examples

    tok = _tokenizer()

    def work() -> int:
        examples, stats = build_examples(path, tok,
                                         DataConfig(format="text", max_length=max_length))
        # One epoch's collated batches, as training keeps them.
        batches(examples, 8, max_length, True, tok.pad_token_id, seed=0, epoch=0)
        return stats.n_tokens
    return work


def run_streaming(path: str, max_length: int, tmp: str):
    from loratune.config import DataConfig
    from loratune.data.batch_stream import BatchStream

    tok = _tokenizer()

    def work() -> int:
        cfg = DataConfig(format="text", max_length=max_length, streaming=True)
        stream = BatchStream(path, tok, cfg, 8, True, tok.pad_token_id, 0)
        while not stream.epoch_done():
            stream.next_batch()  # collated tensors, as training takes them
        return stream.stats.n_tokens
    return work


def run_trl(path: str, max_length: int, tmp: str):
    from datasets import load_dataset
    from trl import pack_dataset

    tok = _tokenizer()
    eos = tok.eos_token_id

    def tokenize(batch):
        return {"input_ids": [ids + [eos] for ids in tok(batch["text"])["input_ids"]]}

    def work() -> int:
        ds = load_dataset("json", data_files=path, split="train", cache_dir=tmp)
        ds = ds.map(tokenize, batched=True, remove_columns=ds.column_names)
        packed = pack_dataset(ds, seq_length=max_length, strategy="bfd")
        return sum(sum(lengths) for lengths in packed["seq_lengths"])
    return work


RUNNERS = {"loratune-memory": run_memory, "loratune-streaming": run_streaming,
           "datasets+trl": run_trl}


def child(name: str, path: str, max_length: int, tmp: str) -> None:
    import resource

    work = RUNNERS[name](path, max_length, tmp)
    t0 = time.perf_counter()
    tokens = work()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"tokens": tokens, "seconds": round(seconds, 2),
                      "peak_rss_mib": round(peak, 1)}))


def measure(name: str, path: Path, max_length: int, tmp: Path) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", name, "--corpus", str(path),
                           "--max-length", str(max_length), "--tmp", str(tmp)],
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=1024, help="corpus size on disk")
    parser.add_argument("--max-length", type=int, default=2048, help="tokens per packed row")
    parser.add_argument("--only", choices=PIPELINES, action="append", help="run these only")
    parser.add_argument("--child", choices=PIPELINES, help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.corpus, args.max_length, args.tmp)
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="data_throughput_") as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        write_corpus(corpus, args.mb)
        size = corpus.stat().st_size / MB
        print(f"corpus: {size:,.1f} MB, rows of {args.max_length} tokens", flush=True)
        print("| pipeline | tokens | seconds | tokens/s | peak RSS MiB |\n|---|---|---|---|---|")
        for name in args.only or PIPELINES:
            r = measure(name, corpus, args.max_length, Path(tmp) / name)
            print(f"| {name} | {r['tokens']:,} | {r['seconds']} | "
                  f"{r['tokens'] / r['seconds']:,.0f} | {r['peak_rss_mib']} |", flush=True)


if __name__ == "__main__":
    main()
