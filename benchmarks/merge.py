#!/usr/bin/env python3
"""Merge time and peak memory: `loratune merge` (streamed) vs PEFT merge_and_unload + save.

Base models: the embedded SmolLM2-135M (its safetensors cache) and a Llama-2-7B-shaped model
with random bf16 weights, written for the benchmark layer by layer into 2 GB shards. Adapter:
a random LoRA r=16 on all linear layers in PEFT's format. Each merge runs in its own process
(its own peak RSS); PEFT loads the model whole, merges in place and saves.

    python benchmarks/merge.py                  # small and 7b (~25 min, ~40 GB of disk)
    python benchmarks/merge.py --shapes small   # the embedded model only

Target: loratune's peak RSS <= 0.5x PEFT's.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

R = 16


def write_random_base(folder: Path, shape: str) -> Path:
    """A Llama checkpoint of `shape` with random bf16 weights, one layer at a time."""
    from transformers import LlamaConfig

    from loratune.models.shapes import LLAMA_SHAPES

    if (folder / "config.json").is_file():
        if not (folder / "model.safetensors.index.json").is_file():
            name_shards(folder)
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    dims = LLAMA_SHAPES[shape]
    config = LlamaConfig(**dims, torch_dtype="bfloat16")
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    h, i, kv = dims["hidden_size"], dims["intermediate_size"], \
        dims["hidden_size"] // dims["num_attention_heads"] * dims["num_key_value_heads"]
    shard: dict[str, torch.Tensor] = {"model.embed_tokens.weight": rand(dims["vocab_size"], h)}
    n = 0

    def flush():
        nonlocal shard, n
        save_file(shard, str(folder / f"model-{n:05d}.safetensors"), metadata={"format": "pt"})
        shard, n = {}, n + 1

    for layer in range(dims["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        for name, (rows, cols) in {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h),
                                   "self_attn.v_proj": (kv, h), "self_attn.o_proj": (h, h),
                                   "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h),
                                   "mlp.down_proj": (h, i)}.items():
            shard[f"{p}{name}.weight"] = rand(rows, cols)
        shard[f"{p}input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        shard[f"{p}post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        if sum(t.numel() * 2 for t in shard.values()) > 2 * 2**30:
            flush()
    shard["model.norm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    shard["lm_head.weight"] = rand(dims["vocab_size"], h)
    flush()
    name_shards(folder)
    config.save_pretrained(folder)
    return folder


def name_shards(folder: Path) -> None:
    """Give the shards transformers' names and write the index it reads."""
    from safetensors import safe_open

    parts = sorted(folder.glob("model-?????.safetensors"))
    weight_map = {}
    for i, part in enumerate(parts):
        final = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        part.rename(folder / final)
        with safe_open(str(folder / final), framework="pt") as f:
            weight_map.update(dict.fromkeys(f.keys(), final))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {},
                                                                     "weight_map": weight_map}))


def write_random_adapter(base: Path, out: Path) -> Path:
    """A PEFT-format LoRA (r=16, all linear layers) with random A and B for `base`."""
    from safetensors import safe_open

    if (out / "adapter_config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for shard in sorted(base.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                if "_proj.weight" not in name:
                    continue
                rows, cols = f.get_slice(name).get_shape()
                path = name[: -len(".weight")]
                tensors[f"base_model.model.{path}.lora_A.weight"] = torch.randn(R, cols, generator=g) * 0.01
                tensors[f"base_model.model.{path}.lora_B.weight"] = torch.randn(rows, R, generator=g) * 0.01
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": R, "lora_alpha": 2 * R,
        "lora_dropout": 0.0, "bias": "none", "target_modules": ["q_proj", "k_proj", "v_proj",
        "o_proj", "gate_proj", "up_proj", "down_proj"], "base_model_name_or_path": str(base)}))
    return out


def run_ours(base: str, adapter: str, out: str) -> dict:
    from loratune.export.merge import merge_folder, read_adapters

    t0 = time.perf_counter()
    merge_folder(Path(base), read_adapters([adapter], None), Path(out), overwrite=True)
    return {"seconds": time.perf_counter() - t0}


def run_peft(base: str, adapter: str, out: str) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    config = json.loads((Path(base) / "config.json").read_text())
    dtype = torch.bfloat16 if "bfloat16" in json.dumps(config) else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out)
    return {"seconds": time.perf_counter() - t0}


def child(which: str, base: str, adapter: str, out: str) -> dict:
    cmd = [sys.executable, __file__, "--child", which, base, adapter, out]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{which} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="small,llama-2-7b")
    ap.add_argument("--work", default="runs/bench-merge")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    args = ap.parse_args()
    if args.child:
        which, base, adapter, out = args.child
        result = (run_ours if which == "loratune" else run_peft)(base, adapter, out)
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        shutil.rmtree(out, ignore_errors=True)
        print(json.dumps(result))
        return 0
    work = Path(args.work)
    rows = []
    for shape in args.shapes.split(","):
        if shape == "small":
            from loratune.models.load import embedded_folder

            base = embedded_folder("smollm2-135m-instruct")
        else:
            print(f"writing a random {shape} checkpoint ...", flush=True)
            base = write_random_base(work / shape, shape)
        adapter = write_random_adapter(base, work / f"adapter-{shape}")
        for which in ("loratune", "peft"):
            print(f"{shape}: {which} merge ...", flush=True)
            r = child(which, str(base), str(adapter), str(work / f"out-{shape}-{which}"))
            rows.append({"shape": shape, "tool": which, **r})
        if not args.keep and shape != "small":
            shutil.rmtree(work / shape, ignore_errors=True)
    print(f"\n{'model':<14}{'tool':<10}{'seconds':>9}{'peak RSS GiB':>14}")
    for r in rows:
        print(f"{r['shape']:<14}{r['tool']:<10}{r['seconds']:>9.1f}{r['peak_rss_gib']:>14.2f}")
    for shape in dict.fromkeys(r["shape"] for r in rows):
        ours, peft = (next(r for r in rows if r["shape"] == shape and r["tool"] == t)
                      for t in ("loratune", "peft"))
        ratio = ours["peak_rss_gib"] / peft["peak_rss_gib"]
        print(f"{shape}: peak RSS {ratio:.2f}x PEFT's (target <= 0.5), time "
              f"{ours['seconds'] / peft['seconds']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
