#!/usr/bin/env python3
"""LoRA on routed experts: our grouped experts forward vs transformers' MoE forward with PEFT.

    python benchmarks/moe_experts.py --threads 1    # ~5 min on a loaded 2-core machine
    python benchmarks/moe_experts.py --quick        # smoke run

One Qwen3-MoE sparse block (router + fused experts; hidden 512, expert width 128, top-8),
LoRA r=16 on both fused expert parameters, 256 tokens, the router frozen, the input requiring
a gradient (as mid-network). Peer: PEFT's `target_parameters` on the same block, which adds
s·B_e·A_e to every expert's whole weight each call, under transformers' experts
implementation "grouped_mm" (its default) and "eager". Ours: `ExpertHost` with tokens grouped
per expert (models/grouped_experts.py), backends "grouped_mm" (what "auto" takes where torch
accepts the operands, CPU too) and "loop". Both sides start from the same A/B; the outputs' max
difference is printed.

"ms": forward + backward, median (and best) of interleaved repeats (each side in turn), so a
busy machine slows all alike; on a shared machine the best is the steadier figure. "saved MiB": storages autograd keeps for backward (parameters
excluded). "peak MiB": the peak over one (second) step above what was held before it: on CUDA
the allocator's, on CPU the rise of peak RSS (VmHWM reset through /proc/self/clear_refs), each
side in its own process, malloc's mmap threshold fixed so freed tensors leave the RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SIDES = ("peft+grouped_mm", "peft+eager", "ours+loop", "ours+grouped_mm")
PARAMS = ("gate_up_proj", "down_proj")


def block(experts: int, dims: dict, device: str):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = Qwen3MoeConfig(num_experts=experts, norm_topk_prob=True, **dims)
    torch.manual_seed(0)
    moe = Qwen3MoeSparseMoeBlock(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.02)
    return moe.to(device).requires_grad_(False), cfg


def lora_factors(experts: int, dims: dict, r: int, device: str) -> dict:
    """A [E, r, in], B [E, out, r] per parameter, shared by both sides."""
    g = torch.Generator().manual_seed(1)
    h, i = dims["hidden_size"], dims["moe_intermediate_size"]
    shapes = {"gate_up_proj": (2 * i, h), "down_proj": (h, i)}
    return {p: (torch.randn(experts, r, inn, generator=g) * 0.02,
                torch.randn(experts, out, r, generator=g) * 0.02)
            for p, (out, inn) in shapes.items()}


def peft_side(experts, dims, r, factors, device, implementation):
    from peft import LoraConfig, inject_adapter_in_model

    moe, cfg = block(experts, dims, device)
    cfg._experts_implementation = implementation
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=[],
                        target_parameters=[f"experts.{p}" for p in PARAMS])
    model = inject_adapter_in_model(config, torch.nn.Sequential(moe))
    wrappers = {"gate_up_proj": moe.experts.base_layer, "down_proj": moe.experts}
    with torch.no_grad():  # PEFT's file layout: A [E·r, in] expert-major, B [out, r·E] rank-major
        for p, (a, b) in factors.items():
            wrappers[p].lora_A["default"].weight.copy_(a.reshape(-1, a.shape[-1]))
            wrappers[p].lora_B["default"].weight.copy_(b.permute(1, 2, 0).reshape(b.shape[1], -1))
    return model


def our_side(experts, dims, r, factors, device, backend):
    from loratune.adapters.expert_lora import ExpertHost, new_expert_lora
    from loratune.config import LoraConfig

    moe, _ = block(experts, dims, device)
    host = ExpertHost(moe.experts)
    ad = new_expert_lora(LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0), "experts",
                         moe.experts, r=r, alpha=2 * r, device=device)
    with torch.no_grad():
        for p, (a, b) in factors.items():
            got_a, got_b = ad.factors(p)
            got_a.copy_(a)
            got_b.copy_(b)
    host.adapters["default"], host.active, host.grouping = ad, {"default": 1.0}, backend
    moe.experts = host
    return moe


def build(side: str, experts: int, dims: dict, r: int, device: str):
    factors = {p: (a.to(device), b.to(device))
               for p, (a, b) in lora_factors(experts, dims, r, device).items()}
    who, how = side.split("+")
    make = peft_side if who == "peft" else our_side
    return make(experts, dims, r, factors, device, how)


def inputs(tokens: int, hidden: int, device: str):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, tokens, hidden, generator=g).to(device).requires_grad_()
    return x, torch.randn(1, tokens, hidden, generator=g).to(device)


def step(model, x, grad_out) -> torch.Tensor:
    out = model(x)
    (out * grad_out).sum().backward()
    return out.detach()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step_ms(model, x, grad_out, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    step(model, x, grad_out)
    sync(device)
    return (time.perf_counter() - t0) * 1e3


def saved_mib(model, x, grad_out) -> float:
    from loratune.train.offload import saved_activation_bytes

    saved, out = saved_activation_bytes(lambda: model(x))
    (out * grad_out).sum().backward()
    return saved / 2**20


def peak_mib(side: str, dims: dict, args) -> dict[int, float]:
    """Per expert count, one step's peak memory above what the side held before it (a step
    already run once); on CPU in a worker process for the side (see the module doc)."""
    if not args.device.startswith("cuda"):
        from process_memory import worker_result

        cmd = [sys.executable, __file__, "--worker", side, "--tokens", str(args.tokens),
               "--r", str(args.r), "--device", args.device, "--experts"]
        cmd += [str(e) for e in args.experts] + (["--quick"] if args.quick else [])
        # a fixed mmap threshold: freed tensors go back to the OS instead of a malloc cache
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        return {int(k): v for k, v in worker_result(cmd, side, env).items()}
    return {e: one_peak(side, e, dims, args) for e in args.experts}


def one_peak(side: str, experts: int, dims: dict, args) -> float:
    model = build(side, experts, dims, args.r, args.device)
    x, grad_out = inputs(args.tokens, dims["hidden_size"], args.device)
    step(model, x, grad_out)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(model, x, grad_out)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: the peak RSS (VmHWM) restarts from the current RSS
    before = _status_kib("VmRSS")
    step(model, x, grad_out)
    return (_status_kib("VmHWM") - before) / 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def worker(args, dims: dict) -> None:
    print(json.dumps({e: one_peak(args.worker, e, dims, args) for e in args.experts}))


def compare(experts: int, dims: dict, args) -> dict:
    models = {s: build(s, experts, dims, args.r, args.device) for s in SIDES}
    x, grad_out = inputs(args.tokens, dims["hidden_size"], args.device)
    outs = {s: step(m, x, grad_out) for s, m in models.items()}  # also the warm-up step
    diff = max((o - outs["peft+eager"]).abs().max().item() for o in outs.values())
    ms = {s: [] for s in SIDES}
    for _ in range(args.repeats):
        for s, m in models.items():
            ms[s].append(step_ms(m, x, grad_out, args.device))
    return {"diff": diff, "ms": {s: statistics.median(v) for s, v in ms.items()},
            "best": {s: min(v) for s, v in ms.items()},
            "saved": {s: saved_mib(m, x, grad_out) for s, m in models.items()}}


def report(experts: int, got: dict, peak: dict) -> None:
    ms, best, saved = got["ms"], got["best"], got["saved"]
    for s in SIDES:
        vs = " | ".join(f"{ms[s] / ms[p]:.2f}x ({best[s] / best[p]:.2f}x)" for p in SIDES[:2])
        print(f"| {experts} | {s} | {ms[s]:.0f} ({best[s]:.0f}) | {vs} | {saved[s]:.1f} | "
              f"{peak[s]:.1f} | {peak[s] / peak['peft+grouped_mm']:.2f}x |", flush=True)
    print(f"| {experts} | max output difference to peft+eager: {got['diff']:.1e} |||||||",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--experts", type=int, nargs="+", default=[8, 32, 64])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    ap.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dims = dict(hidden_size=512, moe_intermediate_size=128, num_experts_per_tok=8)
    if args.quick:
        dims.update(hidden_size=256, moe_intermediate_size=64)
        args.tokens, args.repeats = min(args.tokens, 64), 2
    if args.worker:
        return worker(args, dims)
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads; "
          f"hidden {dims['hidden_size']}, expert width {dims['moe_intermediate_size']}, "
          f"top-{dims['num_experts_per_tok']}, {args.tokens} tokens, LoRA r={args.r}", flush=True)
    print("| experts | side | ms fwd+bwd, median (best) | x peft+grouped_mm | x peft+eager | "
          "saved MiB | peak MiB | x peak |")
    print("|---|---|---|---|---|---|---|---|")
    peaks = {s: peak_mib(s, dims, args) for s in SIDES}
    for experts in args.experts:
        report(experts, compare(experts, dims, args), {s: peaks[s][experts] for s in SIDES})


if __name__ == "__main__":
    main()
