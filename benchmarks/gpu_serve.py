#!/usr/bin/env python3
"""The serving engine's decode loops, old vs new in one run: tokens/s at the SmolLM2-135M shape.

A random-initialized Llama of SmolLM2-135M's shape (30 layers, 576 wide, 9/3 heads, 49152
vocabulary, sdpa attention), 4 random LoRA adapters r=16 on all seven linear layers (written
as benchmarks/serve.py does), 16 concurrent greedy requests with prompts of 8–40 tokens and
32 new tokens each, spread over the adapters, eos ignored. bf16 on CUDA, fp32 on CPU. Loops:

  old       the first loop: transformers' DynamicCache (one concatenation per layer per step,
            kv_cache="dynamic") with each row's LoRA gathered per layer, as it was
  dynamic   kv_cache="dynamic" as it is now (decode steps take the all-slots LoRA matmuls)
  slots     preallocated per-row KV cache written in place, tensor inputs, batched argmax
  graphs    slots with each decode step replayed as a CUDA graph (CUDA only)

Each loop runs the same requests: a warm-up pass (graphs get recorded), then --repeat timed
passes; tokens/s = generated tokens / wall seconds of a pass (median, best), prefill included;
tokens per CPU-second (best pass) is the figure to read on a CPU shared with other jobs.
Every loop's greedy tokens are compared with the same requests run one at a time ("serial"):
equal in fp32; in bf16 a different batch shape may round differently and flip a near-tie.
The tokenizer is a stub (ids as text), as in the GPU measurement of 173 tokens/s.

    python benchmarks/gpu_serve.py                 # on a CUDA machine (meant for < 8 min on one GPU)
    python benchmarks/gpu_serve.py --quick         # CPU smoke: 16 requests x 8 tokens, fp32
    python benchmarks/gpu_serve.py --quick --shape narrow   # 30 layers 64 wide: the per-step
                                                   # overhead a launch-bound GPU step has
    python benchmarks/gpu_serve.py --quick --profile        # where a decode step's time goes
    python benchmarks/gpu_serve.py --device cpu --shape narrow --tokens 300 --step-cost
                                                   # CPU ms per decode step, early and late
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import write_adapters  # noqa: E402  (benchmarks/serve.py: the same random adapters)

SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         tie_word_embeddings=True),
    "narrow": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=30,
                   num_attention_heads=4, num_key_value_heads=2, vocab_size=4096,
                   tie_word_embeddings=True),
}


class StubTokenizer:
    """Token ids as text: the engine's streaming path without tokenizer files."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True) -> str:
        return " ".join(map(str, ids))


def build_model(shape: str, dtype: torch.dtype, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=2048)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def requests(prompts: list[list[int]], names: list[str], tokens: int) -> list:
    from loratune.serve.types import GenerationRequest, SamplingParams

    return [GenerationRequest(list(p), {names[i % len(names)]: 1.0},
                              SamplingParams(max_tokens=tokens)) for i, p in enumerate(prompts)]


def run_pass(engine, reqs: list, device: torch.device, concurrent: bool = True
             ) -> tuple[float, float, list[list[int]]]:
    """Wall and CPU seconds (this process) of one pass, and each request's tokens."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    if concurrent:
        outs = [h.result() for h in [engine.submit(r) for r in reqs]]
    else:
        outs = [engine.submit(r).result() for r in reqs]
    sync(device)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    errors = [o.error for o in outs if o.error]
    if errors:
        raise RuntimeError(f"requests failed: {errors[:3]}")
    return seconds, cpu, [o.token_ids for o in outs]


def make_engine(model, folder: Path, loop: str, args):
    from loratune.serve.engine import Engine
    from loratune.serve.pool import AdapterPool

    kw = {"old": dict(kv_cache="dynamic"), "dynamic": dict(kv_cache="dynamic"),
          "slots": dict(kv_cache="slots", cuda_graphs=False),
          "graphs": dict(kv_cache="slots", cuda_graphs=True)}[loop]
    engine = Engine(model, StubTokenizer(), AdapterPool(folder, max_adapters=args.adapters),
                    base_name="base", max_batch=args.requests, max_prompt_tokens=64,
                    max_completion_tokens=max(args.tokens, 64), **kw)
    engine.eos = set()      # every request makes exactly --tokens tokens: equal work per loop
    engine.row_slots.first_loop = loop == "old"
    return engine


def install_first_loop_lora() -> None:
    """Engines whose RowSlots say `first_loop` gather each row's A and B in decode steps too,
    as the first loop did (the others take the all-slots matmuls)."""
    from loratune.serve.multi_lora import MultiLoraLinear

    real = MultiLoraLinear._all_slots

    def all_slots(self, x, out):
        if getattr(self.row_slots, "first_loop", False):
            return self._gathered(x, out, self.row_slots.rows)
        return real(self, x, out)

    MultiLoraLinear._all_slots = all_slots


def measure(model, folder: Path, names: list[str], prompts, loop: str, args, device) -> dict:
    engine = make_engine(model, folder, loop, args).start()
    try:
        reqs = requests(prompts, names, args.tokens)
        run_pass(engine, reqs, device)                # warm-up: graphs, adapters, caches
        times, cpus, outs = [], [], None
        for _ in range(args.repeat):
            seconds, cpu, outs = run_pass(engine, reqs, device)
            times.append(seconds)
            cpus.append(cpu)
        serial = (run_pass(engine, reqs, device, concurrent=False)[2] if args.serial
                  else None)
        stats = engine.stats()
    finally:
        engine.stop()
    note = stats["kv_cache_note"] or getattr(engine.batch, "graph_note", None)
    if loop == "graphs" and not stats["cuda_graphs"]:
        note = f"graphs turned themselves off: {note}"
    tokens = sum(len(t) for t in outs)
    return {"loop": loop, "tok_s": tokens / statistics.median(times),
            "best_tok_s": tokens / min(times), "cpu_tok_s": tokens / min(cpus), "outs": outs,
            "equal_serial": (f"{sum(a == b for a, b in zip(outs, serial))}/{len(outs)}"
                             if serial else "not run"), "note": note}


def step_cost(model, folder: Path, names: list[str], prompts, loops: list[str], args) -> None:
    """CPU milliseconds of one decode step early and late in the requests, each loop on its
    own copy of the model, loops interleaved in chunks of 8 steps (best chunk of each): the
    engine thread's own time, steady on a CPU shared with other jobs."""
    import copy

    engines = {}
    for loop in loops:
        engine = make_engine(copy.deepcopy(model), folder, loop, args)
        for r in requests(prompts, names, args.tokens):
            engine.submit(r)
        engine.step()                                     # prefill + the first decode step
        engines[loop] = engine
    cost: dict[tuple[str, int], float] = {}
    if args.tokens < 64:
        raise SystemExit("--step-cost needs --tokens 64 or more")
    marks = [8, args.tokens - 30]
    done = 1
    for mark in marks:
        for loop, engine in engines.items():               # every loop to the same step
            for _ in range(mark - done):
                engine.step()
        done = mark
        for _ in range(3):
            for loop, engine in engines.items():
                t0 = time.thread_time()
                for _ in range(8):
                    engine.step()
                ms = (time.thread_time() - t0) / 8 * 1e3
                cost[(loop, mark)] = min(cost.get((loop, mark), ms), ms)
        done += 24
    for engine in engines.values():
        engine.stop()
    base = loops[0]
    print(f"\nCPU ms per decode step ({args.requests} rows; best of 3 chunks of 8 steps, loops "
          "interleaved)")
    print("| loop | " + " | ".join(f"step {m}-{m + 24} | × {base}" for m in marks) + " |")
    print("|---|" + "---|---|" * len(marks))
    for loop in loops:
        cells = [f"{cost[(loop, m)]:.1f} | {cost[(loop, m)] / cost[(base, m)]:.2f}"
                 for m in marks]
        print(f"| {loop} | " + " | ".join(cells) + " |")


def profile(model, folder: Path, names: list[str], prompts, args, device) -> None:
    """torch.profiler over one pass of the slots loop (decode steps dominate)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    engine = make_engine(model, folder, "slots", args)
    reqs = requests(prompts, names, args.tokens)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    handles = [engine.submit(r) for r in reqs]
    engine.step()                                         # admit + prefill, outside the profile
    with torch_profile(activities=activities) as prof:
        while engine.running:
            engine.step()
    for h in handles:
        h.result()
    engine.stop()
    print("\nwhere the slots loop's decode steps spend their time (torch.profiler, top 15):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="bfloat16 on CUDA, float32 on CPU by default")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--loops", default=None,
                    help="comma-separated: old,dynamic,slots,graphs (graphs on CUDA only)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads on CPU (1: stable figures on a CPU shared with other jobs)")
    ap.add_argument("--serial", action=argparse.BooleanOptionalAction, default=True,
                    help="compare with the requests run one at a time (--no-serial: skip)")
    ap.add_argument("--quick", action="store_true", help="CPU smoke: 8 tokens, 1 timed pass")
    ap.add_argument("--profile", action="store_true", help="also profile the slots loop")
    ap.add_argument("--step-cost", action="store_true",
                    help="only CPU ms per decode step, early and late (needs --tokens >= 64)")
    args = ap.parse_args()
    if args.quick:
        args.device, args.tokens, args.repeat = "cpu", 8, 1
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    loops = (args.loops or ("old,dynamic,slots,graphs" if device.type == "cuda"
                            else "old,dynamic,slots")).split(",")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    model = build_model(args.shape, dtype, device)
    g = torch.Generator().manual_seed(11)
    vocab = SHAPES[args.shape]["vocab_size"]
    prompts = [torch.randint(0, vocab, (int(torch.randint(8, 41, (1,), generator=g)),),
                             generator=g).tolist() for _ in range(args.requests)]
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU, {torch.get_num_threads()} torch threads")
    print(f"{args.shape} shape (random weights), {str(dtype).removeprefix('torch.')}, {name}; "
          f"{args.requests} concurrent requests x {args.tokens} tokens, {args.adapters} LoRA "
          f"adapters r={args.rank}, prompts 8-40 tokens")
    t_start = time.perf_counter()
    install_first_loop_lora()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        names = write_adapters(model, folder, args.adapters, args.rank)
        if args.step_cost:
            step_cost(model, folder, names, prompts, loops, args)
            print(f"\n{time.perf_counter() - t_start:.0f} s in all")
            return 0
        results = [measure(model, folder, names, prompts, loop, args, device) for loop in loops]
        if args.profile:
            profile(model, folder, names, prompts, args, device)
    base = results[0]
    print(f"\n| loop | tokens/s (median of {args.repeat}) | best | × {base['loop']} | "
          f"tokens per CPU-second | × {base['loop']} | greedy = serial | = {base['loop']} |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        same = sum(a == b for a, b in zip(r["outs"], base["outs"]))
        print(f"| {r['loop']} | {r['tok_s']:.1f} | {r['best_tok_s']:.1f} | "
              f"{r['tok_s'] / base['tok_s']:.2f} | {r['cpu_tok_s']:.1f} | "
              f"{r['cpu_tok_s'] / base['cpu_tok_s']:.2f} | {r['equal_serial']} | "
              f"{same}/{args.requests} |")
    for r in results:
        if r["note"]:
            print(f"note ({r['loop']}): {r['note']}")
    print(f"\n{time.perf_counter() - t_start:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
