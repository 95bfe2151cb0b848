#!/usr/bin/env python3
"""MoE memory: training steps of a random-init Qwen3-MoE / Mixtral, measured against the planner.

The model is built from its transformers config class at a shape whose routed experts weigh
288 MiB in fp32 (a third of the LoRA peak; the interpreter and libraries are half), LoRA r=16
on attention and on every routed expert (per-expert A/B, adapters/expert_lora.py), activation
checkpointing, AdamW, fp32 on CPU. `--quant` holds the experts (and the attention linears) in
NF4 first: QLoRA. Each setup runs in its own process; the parent prints the peak RSS of two
steps (the kernel's high-water mark, reset after loading as benchmarks/qlora_memory.py does)
beside the planner's estimate for the same shape (read from the model's config): the total,
what is loaded before the step and what the step adds, and the planner's parts.

    python benchmarks/moe_memory.py                   # qwen3_moe and mixtral, LoRA and QLoRA
    python benchmarks/moe_memory.py --family mixtral --seq 1024
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

# model_type -> config fields (on top of SHARED): routed experts 288 MiB in fp32.
FAMILIES = {
    "qwen3_moe": dict(moe_intermediate_size=256, intermediate_size=1024, num_experts=32,
                      num_experts_per_tok=4, head_dim=64, norm_topk_prob=True),
    "mixtral": dict(intermediate_size=512, num_local_experts=16, num_experts_per_tok=2),
}
SHARED = dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
              vocab_size=4096, max_position_embeddings=2048, tie_word_embeddings=False)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "experts"]
RANK, CHUNK = 16, 256


def model_config(family: str, layers: int = SHARED["num_hidden_layers"]):
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(family, **{**SHARED, "num_hidden_layers": layers},
                               **FAMILIES[family])
    cfg._attn_implementation = "sdpa"
    return cfg


def build(family: str, quant: bool, layers: int):
    from transformers import AutoModelForCausalLM

    from loratune.config import QuantConfig
    from loratune.models.quantize import prepare_for_kbit_training, quantize_model

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config(family, layers), dtype=torch.float32)
    if quant:  # what load_quantized ends with: every linear but lm_head and the experts in NF4
        quantize_model(model, QuantConfig())
        prepare_for_kbit_training(model)
    return model


def worker(args) -> dict:
    from loratune.adapters import add_adapter, trainable_report
    from loratune.config import LoraConfig
    from loratune.train.host_memory import use_mmap_for_large_blocks

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from qlora_memory import measured_steps, rss_gib

    use_mmap_for_large_blocks()  # freed blocks go back to the kernel (loratune train does this)
    model = build(args.family, args.quant, args.layers)
    add_adapter(model, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS))
    # two steps: AdamW's states exist only from the first opt.step on, and the planner counts
    # them beside the activations, as every later step holds them
    after_load, times = measured_steps(model, args.batch, args.seq, args.steps, chunk=CHUNK)
    return {"family": args.family, "method": "qlora" if args.quant else "lora",
            "layers": args.layers,
            "rss_after_load_gib": after_load, "step_peak_gib": rss_gib("VmHWM"),
            "s_per_step": min(times), "trainable": trainable_report(model)[2]}


def planned(family: str, method: str, batch: int, seq: int,
            layers: int = SHARED["num_hidden_layers"]):
    """The planner's Breakdown for this very step (CPU, fp32, chunked loss)."""
    from loratune.plan import Setup, estimate
    from loratune.plan.shapes import ModelShape

    shape = ModelShape.from_hf_config(model_config(family, layers).to_dict(), name=family)
    return estimate(shape, Setup(method=method, batch=batch, seq=seq, rank=RANK, dtype="fp32",
                                 checkpointing=True, loss_chunk=CHUNK, device="cpu",
                                 experts=True))


def measure(family: str, quant: bool, batch: int, seq: int, steps: int = 2,
            layers: int = SHARED["num_hidden_layers"]) -> dict:
    """Run the worker in its own process (a clean peak); returns its JSON line."""
    cmd = [sys.executable, __file__, "--worker", "--family", family, "--batch", str(batch),
           "--seq", str(seq), "--steps", str(steps), "--layers", str(layers)] \
        + (["--quant"] if quant else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"moe_memory worker ({family}, quant={quant}) failed:\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(run: dict, batch: int, seq: int) -> None:
    plan = planned(run["family"], run["method"], batch, seq, run["layers"]).as_dict()
    parts = ", ".join(f"{k} {v / 2**30:.3f}" for k, v in plan.items() if v and k != "total")
    # what is there before the step (weights, adapter, runtime), and what the step adds
    loaded = sum(plan[k] for k in ("weights", "quant_stats", "adapter", "overhead")) / 2**30
    rise = run["step_peak_gib"] - run["rss_after_load_gib"]
    print(f"{run['family']:<10}{run['method']:<7}{run['step_peak_gib']:>10.3f}"
          f"{plan['total'] / 2**30:>9.3f}{plan['total'] / 2**30 / run['step_peak_gib']:>7.2f}"
          f"{run['rss_after_load_gib']:>8.3f}{loaded:>8.3f}{rise:>8.3f}"
          f"{plan['total'] / 2**30 - loaded:>8.3f}{run['s_per_step']:>8.1f}   {parts}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--family", choices=sorted(FAMILIES), action="append")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--layers", type=int, default=SHARED["num_hidden_layers"])
    p.add_argument("--quant", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.family = args.family[0]
        print(json.dumps(worker(args)))
        return
    print(f"MoE step, batch {args.batch} x {args.seq}, LoRA r={RANK} on {'+'.join(TARGETS)}, "
          f"checkpointing, fp32, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"{'family':<10}{'method':<7}{'peak GiB':>10}{'planned':>9}{'ratio':>7}"
          f"{'loaded':>8}{'plan':>8}{'rise':>8}{'plan':>8}{'s/step':>8}   planner's parts (GiB)")
    for family in args.family or sorted(FAMILIES, reverse=True):
        for quant in (False, True):
            run = measure(family, quant, args.batch, args.seq, args.steps, args.layers)
            report(run, args.batch, args.seq)


if __name__ == "__main__":
    main()
