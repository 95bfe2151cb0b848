#!/usr/bin/env python3
"""Load test of `loratune serve`: N concurrent streaming clients, mixed adapters, loopback only.

A child process serves the embedded SmolLM2-135M-Instruct with 8 random LoRA adapters
(r=16, all linear layers) written to a temp dir; this process runs the clients (asyncio +
httpx), so client work does not compete with the server for the GIL. The peer, measured in
the same run, is the same server with continuous batching off (--max-batch 1).

    python benchmarks/serve_load.py                      # 16 clients, 20 s per server
    python benchmarks/serve_load.py --quick              # 4 clients, 6 s, no peer

Prints errors (must be 0), requests/s, generated tokens/s, p50/p99 latency and
time-to-first-token, and the adapter pool's hits/misses/evictions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import random
import re
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

MODEL = "smollm2-135m-instruct"
PROMPTS = [
    "Write one sentence about rivers.", "What is a prime number?", "Name three colors.",
    "Explain what a CPU does in one sentence.", "Give me a short greeting.",
    "请用一句话介绍长城。", "What is the opposite of hot?", "Summarize: cats sleep a lot.",
]


def serve(port: int, adapter_dir: str, max_batch: int, max_adapters: int, threads: int) -> None:
    """Child process: load the model, write adapters on first use, serve until killed."""
    import torch
    import uvicorn

    from loratune.models import load_model
    from loratune.serve.api import build_app
    from loratune.serve.engine import Engine
    from loratune.serve.pool import AdapterPool
    from serve import write_adapters   # benchmarks/serve.py: the same random adapters

    torch.set_num_threads(threads)
    model, tok = load_model(MODEL)
    folder = Path(adapter_dir)
    if not any(folder.iterdir()):
        write_adapters(model, folder, 8, 16)
    engine = Engine(model, tok, AdapterPool(folder, max_adapters=max_adapters), base_name=MODEL,
                    max_batch=max_batch, max_queue=256)
    engine.start()
    uvicorn.run(build_app(engine), host="127.0.0.1", port=port, log_level="warning")


@dataclass
class Sample:
    ok: bool
    latency: float = 0.0
    ttft: float | None = None
    tokens: int = 0
    error: str = ""


@dataclass
class Run:
    name: str
    samples: list[Sample] = field(default_factory=list)
    seconds: float = 0.0
    metrics: dict = field(default_factory=dict)


async def one_request(http, url: str, rng: random.Random, models: list[str],
                      max_tokens: int) -> Sample:
    body = {"model": rng.choice(models),
            "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
            "max_tokens": max_tokens, "temperature": 0.7, "seed": rng.randrange(2**31),
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens, done = None, 0, False
    try:
        async with http.stream("POST", url + "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                return Sample(False, error=f"{resp.status_code} {(await resp.aread())[:200]!r}")
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Sample(False, error=chunk["error"]["message"])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif ttft is None and chunk["choices"][0]["delta"].get("content"):
                    ttft = time.perf_counter() - t0
    except Exception as err:  # every failure is counted and shown, none is fatal
        return Sample(False, error=f"{type(err).__name__}: {err}")
    if not done:
        return Sample(False, error="stream ended without [DONE]")
    return Sample(True, time.perf_counter() - t0, ttft, tokens)


async def drive(url: str, clients: int, seconds: float, max_tokens: int, models: list[str],
                seed: int) -> tuple[list[Sample], float]:
    """`clients` loops sending requests back to back; no new request after `seconds`."""
    import httpx

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        start = time.perf_counter()
        stop_at = start + seconds

        async def client(i: int) -> list[Sample]:
            rng = random.Random(seed * 1000 + i)
            out = []
            while time.perf_counter() < stop_at:
                out.append(await one_request(http, url, rng, models, max_tokens))
            return out

        results = await asyncio.gather(*(client(i) for i in range(clients)))
        return [s for r in results for s in r], time.perf_counter() - start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc, timeout: float = 300) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if not proc.is_alive():
            sys.exit(f"server process exited with code {proc.exitcode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    sys.exit("server did not become ready")


def scrape(url: str) -> dict[str, float]:
    import httpx

    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        m = re.fullmatch(r"(loratune_adapter_pool_\w+_total) (\S+)", line)
        if m:
            out[m.group(1).removeprefix("loratune_adapter_pool_").removesuffix("_total")] = \
                float(m.group(2))
    return out


def measure(name: str, args, adapter_dir: str, max_batch: int) -> Run:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = mp.get_context("spawn").Process(
        target=serve, args=(port, adapter_dir, max_batch, args.max_adapters, args.threads),
        daemon=True)
    proc.start()
    try:
        wait_ready(url, proc)
        models = [MODEL] + [f"lora{i:02d}" for i in range(8)]  # names serve.py writes
        asyncio.run(drive(url, 2, 2.0, 4, models, seed=99))          # warm-up, not counted
        samples, seconds = asyncio.run(drive(url, args.clients, args.duration, args.max_tokens,
                                             models, args.seed))
        return Run(name, samples, seconds, scrape(url))
    finally:
        proc.terminate()
        proc.join(timeout=10)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def report(runs: list[Run]) -> None:
    print("\n| server | requests | errors | req/s | gen tokens/s | p50 latency s | p99 latency s "
          "| p50 TTFT s | p99 TTFT s | pool hits/misses/evictions |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        ok = [s for s in run.samples if s.ok]
        lat = [s.latency for s in ok]
        ttft = [s.ttft for s in ok if s.ttft is not None]
        m = run.metrics
        print(f"| {run.name} | {len(run.samples)} | {len(run.samples) - len(ok)} | "
              f"{len(ok) / run.seconds:.2f} | {sum(s.tokens for s in ok) / run.seconds:.1f} | "
              f"{pct(lat, .5):.2f} | {pct(lat, .99):.2f} | {pct(ttft, .5):.2f} | "
              f"{pct(ttft, .99):.2f} | {m.get('hits', 0):.0f}/{m.get('misses', 0):.0f}/"
              f"{m.get('evictions', 0):.0f} |")
        errors = [s.error for s in run.samples if not s.ok]
        for err in errors[:5]:
            print(f"  error ({run.name}): {err}")
    if len(runs) == 2 and runs[1].samples:
        a, b = (sum(s.tokens for s in r.samples if s.ok) / r.seconds for r in runs)
        print(f"\ngenerated tokens/s, continuous batching vs one at a time: "
              f"{a / b if b else float('nan'):.2f}x")
    print(f"(mean tokens per answer: "
          f"{statistics.mean([s.tokens for s in runs[0].samples if s.ok] or [0]):.1f})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load per server")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-adapters", type=int, default=8, help="adapter slots (8 = all fit)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads in the server; more only on an idle machine: OpenMP "
                   "threads spin-wait, and with other jobs on the cores a step was 20x slower "
                   "with 2 threads than with 1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-peer", action="store_true", help="skip the --max-batch 1 server")
    p.add_argument("--quick", action="store_true", help="4 clients, 6 s, no peer")
    args = p.parse_args()
    if args.quick:
        args.clients, args.duration, args.no_peer = 4, 6.0, True
    print(f"{args.clients} clients, {args.duration:.0f} s, max_tokens {args.max_tokens}, "
          f"8 adapters (r=16, all-linear) + base, {args.max_adapters} slots, streaming")
    with tempfile.TemporaryDirectory(prefix="loratune-serve-load-") as adapter_dir:
        runs = [measure(f"batch {args.max_batch}", args, adapter_dir, args.max_batch)]
        if not args.no_peer:
            runs.append(measure("batch 1 (peer)", args, adapter_dir, 1))
    report(runs)
    return 1 if any(not s.ok for r in runs for s in r.samples) else 0


if __name__ == "__main__":
    raise SystemExit(main())
