#!/usr/bin/env python3
"""train.fused_lora on CPU: activation memory kept for backward and step time, fused vs plain.

    python benchmarks/fused_lora.py            # ~2 min on 2 cores
    python benchmarks/fused_lora.py --quick    # smoke run

A random Llama (hidden 256, 4 layers, LoRA r=16 on all linear layers), 4 rows x 128 tokens,
no checkpointing (every layer's saved tensors count). "saved MiB": distinct storages autograd
keeps for backward during one forward, parameters excluded (a saved_tensors_hooks count).
"ms/step": forward + backward, median of interleaved repeats (plain, fused, plain, ...), so a
busy machine slows both alike. Rows: fp32 base, and bf16 base with fp32 adapters (the default
adapter.dtype), each with dropout 0 and 0.05.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def build(dtype: torch.dtype, dropout: float, dims: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    from loratune.adapters import add_adapter
    from loratune.config import LoraConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(**dims, max_position_embeddings=1024)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).to(dtype).requires_grad_(False)
    add_adapter(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout), "default")
    return model.train()


def saved_mib(model, ids) -> float:
    from loratune.train.offload import saved_activation_bytes

    saved, loss = saved_activation_bytes(lambda: model(ids, labels=ids).loss)
    loss.backward()
    return saved / 2**20


def step_ms(model, ids) -> float:
    t0 = time.perf_counter()
    model(ids, labels=ids).loss.backward()
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    from loratune.adapters.fused_lora import set_fused_lora

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    dims = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=4, vocab_size=2048)
    rows, seq, repeats = 4, 128, 5
    if args.quick:
        dims.update(hidden_size=128, intermediate_size=256, num_hidden_layers=2)
        rows, seq, repeats = 2, 64, 2
    ids = torch.randint(0, dims["vocab_size"], (rows, seq), generator=torch.Generator()
                        .manual_seed(1))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {rows}x{seq} tokens",
          flush=True)
    print("| base | dropout | plain saved MiB | fused saved MiB | x | plain ms | fused ms | x |")
    print("|---|---|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for dropout in (0.0, 0.05):
            model = build(dtype, dropout, dims)
            mib, ms = {}, {False: [], True: []}
            for fused in (False, True):
                set_fused_lora(model, fused)
                mib[fused] = saved_mib(model, ids)
            for _ in range(repeats):
                for fused in (False, True):
                    set_fused_lora(model, fused)
                    ms[fused].append(step_ms(model, ids))
            med = {k: statistics.median(v) for k, v in ms.items()}
            print(f"| {str(dtype).removeprefix('torch.')} | {dropout} | {mib[False]:.1f} | "
                  f"{mib[True]:.1f} | {mib[True] / mib[False]:.2f} | {med[False]:.0f} | "
                  f"{med[True]:.0f} | {med[True] / med[False]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
