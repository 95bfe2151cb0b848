#!/usr/bin/env python3
"""Serving many adapters over one base: mixed batches, continuous batching, the LRU pool.

On the embedded SmolLM2-135M-Instruct with random-initialized LoRA adapters (r=16, all linear
layers), one run measures:

(a) forward time of one batch (8 rows × --seq tokens): 8 rows with 8 different adapters,
    the same rows all on one adapter, the base model alone, and PEFT's mixed batch
    (`adapter_names=`) on the same weights — ratios against ours with one adapter;
(b) generation throughput of 32 concurrent requests over the 8 adapters (continuous batching)
    vs the same 32 requests one after another, and vs 32 concurrent requests on one adapter
    (the seed's "10 switched adapters vs one" cost);
(c) adapter cold-load time and LRU behaviour with max_adapters=4 and 16 adapters in rotation;
(d) generation throughput of concurrent requests over one adapter of each served method (LoRA,
    rsLoRA, AdaLoRA, DoRA, IA³: per-row scales beside the LoRA slots; MoE-LoRA (4 experts, top 2)
    and Houlsby bottleneck blocks (size 64): nonlinear blocks run on their own rows) vs the same
    requests over as many plain LoRA adapters (issue 25's goal: within 1.3x).

    python benchmarks/serve.py               # ~3 min on 2 cores
    python benchmarks/serve.py --quick       # smoke run: --requests 8 --tokens 8 --repeat 3
    python benchmarks/serve.py --methods-only --requests 16 --tokens 16   # (d) alone
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

MODEL = "smollm2-135m-instruct"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_adapters(model, folder: Path, n: int, rank: int) -> list[str]:
    """`n` random LoRA adapters saved in PEFT format; the model is left without adapters."""
    from loratune.adapters import add_adapter, delete_adapter, save_adapter
    from loratune.config import LoraConfig

    names = []
    for i in range(n):
        name = f"lora{i:02d}"
        torch.manual_seed(i)
        add_adapter(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS), name)
        for mod in model.modules():
            if name in getattr(mod, "adapters", {}):
                torch.nn.init.normal_(mod.adapters[name].lora_B, std=0.02)
        save_adapter(model, folder / name, name)
        delete_adapter(model, name)
        names.append(name)
    return names


def median_time(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def forward_ratios(model, tok, folder: Path, names: list[str], seq: int, repeat: int) -> None:
    from loratune.serve.pool import AdapterPool

    pool = AdapterPool(folder, max_adapters=len(names))
    slots = pool.bind(model)
    rows = [pool.acquire({n: 1.0}) for n in names]
    ids = torch.randint(0, len(tok), (len(names), seq), generator=torch.Generator().manual_seed(0))

    def run(slot_list):
        def go():
            slots.set(slot_list, ids.device)
            model(input_ids=ids, logits_to_keep=1)
        return go

    t_mixed = median_time(run(rows), repeat)
    t_one = median_time(run([rows[0]] * len(rows)), repeat)
    t_base = median_time(run([0] * len(rows)), repeat)
    slots.set(rows, ids.device)
    ours = model(input_ids=ids).logits
    slots.rows = None

    import peft
    from loratune.models import load_model

    theirs, _ = load_model(MODEL)
    theirs = peft.PeftModel.from_pretrained(theirs, folder / names[0], adapter_name=names[0])
    for n in names[1:]:
        theirs.load_adapter(folder / n, adapter_name=n)
    theirs.eval()
    t_peft = median_time(lambda: theirs(input_ids=ids, adapter_names=names, logits_to_keep=1),
                         repeat)
    gap = (theirs(input_ids=ids, adapter_names=names).logits - ours).abs().max().item()
    print(f"\n(a) forward of {len(names)} rows × {seq} tokens (median of {repeat})")
    print(f"  {'case':34} {'ms':>8} {'vs one adapter':>15}")
    for label, t in [("base model, no adapter", t_base), ("ours, one adapter for all rows", t_one),
                     (f"ours, {len(names)} adapters mixed", t_mixed),
                     (f"PEFT, {len(names)} adapters mixed", t_peft)]:
        print(f"  {label:34} {t * 1e3:8.1f} {t / t_one:14.2f}x")
    print(f"  mixed/single = {t_mixed / t_one:.2f} (target ≤ 1.2); ours/PEFT mixed = "
          f"{t_mixed / t_peft:.2f} (target < 1); max |logit gap| vs PEFT = {gap:.2e}")
    del theirs


def write_method_adapters(model, folder: Path, rank: int) -> list[str]:
    """One random adapter per served non-LoRA method (B, E, up-projections, magnitudes and IA³
    vectors moved off their init so each does work); the model is left without adapters."""
    from loratune.adapters import AdapterHost, add_adapter, delete_adapter, save_adapter
    from loratune.config import (AdaLoraConfig, BottleneckConfig, IA3Config, LoraConfig,
                                 MoeLoraConfig)

    configs = {
        "rslora": LoraConfig(r=rank, lora_alpha=rank, use_rslora=True, target_modules=TARGETS),
        "adalora": AdaLoraConfig(init_r=rank, target_r=rank, lora_alpha=rank,
                                 target_modules=TARGETS),
        "dora": LoraConfig(r=rank, lora_alpha=2 * rank, use_dora=True, target_modules=TARGETS),
        "ia3": IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                         feedforward_modules=["down_proj"]),
        "moe_lora": MoeLoraConfig(r=rank, lora_alpha=2 * rank, num_experts=4, top_k=2,
                                  target_modules=TARGETS),
        "bottleneck": BottleneckConfig(bottleneck_size=64),
    }
    for name, config in configs.items():
        torch.manual_seed(len(name))
        add_adapter(model, config, name)
        with torch.no_grad():
            for mod in model.modules():
                if isinstance(mod, AdapterHost) and name in mod.adapters:
                    for key, p in mod.adapters[name].named_parameters():
                        if key in ("lora_B", "lora_E") or key.startswith("adapter_up"):
                            torch.nn.init.normal_(p, std=0.02)
                        elif key in ("ia3_l", "lora_magnitude_vector"):
                            p.mul_(1 + 0.02 * torch.randn_like(p))
        save_adapter(model, folder / name, name)
        delete_adapter(model, name)
    return list(configs)


def run_requests(engine, requests, concurrent: bool) -> tuple[float, int]:
    t0 = time.perf_counter()
    tokens = 0
    if concurrent:
        handles = [engine.submit(r) for r in requests]
        tokens = sum(len(h.result().token_ids) for h in handles)
    else:
        for r in requests:
            tokens += len(engine.submit(r).result().token_ids)
    return time.perf_counter() - t0, tokens


def throughput(model, tok, folder: Path, names: list[str], n_requests: int, n_tokens: int
               ) -> None:
    from loratune.serve.engine import Engine
    from loratune.serve.pool import AdapterPool
    from loratune.serve.types import GenerationRequest, SamplingParams

    engine = Engine(model, tok, AdapterPool(folder, max_adapters=len(names)), base_name=MODEL,
                    max_batch=n_requests).start()
    engine.eos = set()   # every request generates exactly n_tokens: equal work in every case
    questions = ["What is the capital of France?", "Write one sentence about the sea.",
                 "把下面的请求转换成命令。明天早上七点叫醒我", "Start a 12 minute timer"]

    def reqs(adapter_of):
        out = []
        for i in range(n_requests):
            msgs = [{"role": "user", "content": questions[i % len(questions)]}]
            ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                          return_dict=True)["input_ids"]
            out.append(GenerationRequest(list(ids), {adapter_of(i): 1.0},
                                         SamplingParams(max_tokens=n_tokens)))
        return out

    mixed = reqs(lambda i: names[i % len(names)])
    run_requests(engine, mixed[:2], True)   # warm-up
    t_conc, tok_conc = run_requests(engine, mixed, True)
    t_one, tok_one = run_requests(engine, reqs(lambda i: names[0]), True)
    t_serial, tok_serial = run_requests(engine, mixed, False)
    engine.stop()
    print(f"\n(b) generation: {n_requests} requests × {n_tokens} tokens")
    print(f"  {'case':44} {'tokens/s':>9}")
    for label, t, n in [(f"concurrent, {len(names)} adapters (continuous batch)", t_conc, tok_conc),
                        ("concurrent, all on one adapter", t_one, tok_one),
                        (f"serial, one request at a time, {len(names)} adapters", t_serial,
                         tok_serial)]:
        print(f"  {label:44} {n / t:9.1f}")
    print(f"  continuous batching vs serial: {t_serial / t_conc:.2f}x; cost of {len(names)} "
          f"adapters vs one: {(t_conc / t_one - 1) * 100:+.1f}% time (seed: ~14% for 10)")


def methods_throughput(model, tok, folder: Path, loras: list[str], n_requests: int,
                       n_tokens: int, repeat: int) -> None:
    """(d): the same requests over [LoRA, rsLoRA, AdaLoRA, DoRA, IA³, MoE-LoRA, bottleneck]
    and over as many LoRAs."""
    from loratune.serve.engine import Engine
    from loratune.serve.pool import AdapterPool
    from loratune.serve.types import GenerationRequest, SamplingParams

    methods = [loras[0], *write_method_adapters(model, folder, 16)]
    plain = loras[:len(methods)]
    engine = Engine(model, tok, AdapterPool(folder, max_adapters=2 * len(methods)),
                    base_name=MODEL, max_batch=n_requests).start()
    engine.eos = set()
    ids = tok("Write one sentence about the sea.")["input_ids"]

    def reqs(names):
        return [GenerationRequest(list(ids), {names[i % len(names)]: 1.0},
                                  SamplingParams(max_tokens=n_tokens)) for i in range(n_requests)]

    run_requests(engine, reqs(methods + plain), True)   # warm-up: every adapter loaded
    times = {"lora": [], "methods": []}
    for _ in range(repeat):   # interleaved, so drift in the machine's load hits both alike
        for label, names in (("lora", plain), ("methods", methods)):
            t, n = run_requests(engine, reqs(names), True)
            times[label].append(n / t)
    engine.stop()
    lora_tps, mixed_tps = (statistics.median(times[k]) for k in ("lora", "methods"))
    print(f"\n(d) mixed methods: {n_requests} concurrent requests × {n_tokens} tokens, median "
          f"of {repeat}")
    print(f"  {len(plain)} LoRA adapters:                 {lora_tps:9.1f} tokens/s")
    print(f"  {', '.join(methods)}: {mixed_tps:9.1f} tokens/s")
    print(f"  LoRA-only vs mixed-method throughput: {lora_tps / mixed_tps:.2f}x (goal ≤ 1.3x)")


def lru(model, tok, folder: Path, names: list[str], capacity: int) -> None:
    from loratune.serve.engine import Engine
    from loratune.serve.pool import AdapterPool
    from loratune.serve.types import GenerationRequest, SamplingParams

    pool = AdapterPool(folder, max_adapters=capacity)
    engine = Engine(model, tok, pool, base_name=MODEL).start()
    ids = tok("Hello")["input_ids"]
    t0 = time.perf_counter()
    for rnd in range(2):
        for n in names:
            engine.submit(GenerationRequest(ids, {n: 1.0}, SamplingParams(max_tokens=1))).result()
    seconds = time.perf_counter() - t0
    hot = names[:capacity]
    for n in hot:   # a working set that fits: every request after the first pass hits
        engine.submit(GenerationRequest(ids, {n: 1.0}, SamplingParams(max_tokens=1))).result()
    before = pool.stats()
    for n in hot:
        engine.submit(GenerationRequest(ids, {n: 1.0}, SamplingParams(max_tokens=1))).result()
    after = pool.stats()
    engine.stop()
    s = after
    print(f"\n(c) pool: max_adapters={capacity}, {len(names)} adapters in rotation × 2 rounds "
          f"({seconds:.1f} s, 1 token each)")
    print(f"  loads {s['loads']}, hits {s['hits']}, misses {s['misses']}, evictions "
          f"{s['evictions']}; cold load {s['load_seconds'] / max(s['loads'], 1) * 1e3:.1f} ms "
          f"per adapter (read, check, fill slots)")
    print(f"  working set of {capacity} that fits: {after['hits'] - before['hits']} hits, "
          f"{after['misses'] - before['misses']} misses on the second pass")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64, help="tokens per row in (a)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per request in (b)")
    ap.add_argument("--pool", type=int, default=4, help="max_adapters in (c)")
    ap.add_argument("--rotation", type=int, default=16, help="adapters in rotation in (c)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: stable figures on a CPU shared with other jobs)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 8 requests x 8 tokens, 3 repeats")
    ap.add_argument("--methods-only", action="store_true", help="run (d) alone")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.tokens, args.repeat = 8, 8, 3
    torch.set_num_threads(args.threads)

    from loratune.models import load_model

    model, tok = load_model(MODEL)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        names = write_adapters(model, folder, max(args.adapters, args.rotation), args.rank)
        print(f"{MODEL}, {len(names)} random LoRA adapters r={args.rank} on {', '.join(TARGETS)}; "
              f"{torch.get_num_threads()} threads")
        if not args.methods_only:
            forward_ratios(model, tok, folder, names[:args.adapters], args.seq, args.repeat)
            throughput(model, tok, folder, names[:args.adapters], args.requests, args.tokens)
            lru(model, tok, folder, names[:args.rotation], args.pool)
        methods_throughput(model, tok, folder, names, args.requests, args.tokens, args.repeat)


if __name__ == "__main__":
    main()
