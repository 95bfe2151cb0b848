#!/usr/bin/env python3
"""Training step on one GPU: loratune against PEFT (LoRA) and PEFT + bitsandbytes (QLoRA), and
each of loratune's speed levers on and off. One command, one table (issue 15).

    python benchmarks/gpu_train.py                  # CUDA: Llama-3.2-1B and Llama-3-8B shapes
    python benchmarks/gpu_train.py --quick          # tiny shapes on CPU: every code path
    python benchmarks/gpu_train.py --out DIR        # also DIR/gpu_train.json

Rows (LoRA r=16, alpha=32, all linear layers, dropout 0, AdamW lr 1e-4, bf16 base,
checkpointing, random-initialised models of the real shapes built in bf16 on the device, never
in full-size fp32; QLoRA bases are quantized from that bf16 model layer by layer):
  lora      1B and 8B at 4×2048: PEFT with bf16 adapters vs ours with bf16 adapters (equal
            adapter dtype), then ours with each lever; PEFT and ours with fp32 adapters.
  qlora     8B at 1×2048 and 2×2048: PEFT + bitsandbytes NF4 + double quant vs ours (NF4 + double
            quant, bf16 compute), plain and fused; skipped, saying so, without bitsandbytes.
  packed    1B at 4×2048 packed with 8 documents per row: model.packed_attention = mask (the
            dense block mask transformers builds for sdpa) vs flex (flex_attention's document
            mask) vs varlen (FlashAttention's variable-length kernel, with flash-attn).
Levers: fused = train.fused_lora; offload = train.offload_activations (pinned host copies of
the checkpointed layer inputs); liger = model.fused_kernels (when liger-kernel is installed).

Each row: ms/step (warm-up steps, then timed steps between two synchronisations), peak GPU
memory (torch.cuda.max_memory_allocated over the timed steps), the loss at the first and last
step (same base weights and the same adapter start for every row of a shape: losses track each
other), and ratios against the PEFT row of the same shape and adapter dtype. A time budget
(--budget-s, default 450) skips the rows left, naming them. On CPU (--quick) there is no GPU
memory to report ("-") and the timings only show the code runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
import traceback
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

GiB = 2**30
SHAPES = {  # transformers LlamaConfig fields
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
               tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
               tie_word_embeddings=False),
    "tiny-1b": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                    tie_word_embeddings=True),
    "tiny-8b": dict(hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                    tie_word_embeddings=False),
}
RANK, ALPHA, LR = 16, 32, 1e-4


@dataclass
class Row:
    group: str
    shape: str
    batch: str
    who: str
    adapters: str
    levers: str = "-"
    ms: float | None = None
    peak_gib: float | None = None
    losses: list[float] = field(default_factory=list)
    note: str = ""


@dataclass
class Bench:
    device: torch.device
    warmup: int
    steps: int
    budget_s: float
    t0: float = field(default_factory=time.monotonic)
    rows: list[Row] = field(default_factory=list)

    def over_budget(self) -> bool:
        return time.monotonic() - self.t0 > self.budget_s


# ------------------------------------------------------------------ device helpers
def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)


def peak_gib(dev: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(dev) / GiB if dev.type == "cuda" else None


# ------------------------------------------------------------------ models
def build_bf16(dims: dict, dev: torch.device, attn: str = "sdpa"):
    """A random Llama made on `dev` in bf16 (seed 0: the same weights for every row)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**dims, max_position_embeddings=8192)
    cfg.use_cache = False
    torch.manual_seed(0)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16,
                                                 attn_implementation=attn)
    return model


def build_ours_4bit(dims: dict, dev: torch.device):
    """The bf16 model, each decoder linear layer replaced by loratune's NF4 + double quant."""
    from loratune.config import QuantConfig
    from loratune.models.quantize import prepare_for_kbit_training, quantize_model

    model = build_bf16(dims, dev)
    quantize_model(model, QuantConfig(compute_dtype="bfloat16"))
    prepare_for_kbit_training(model, torch.bfloat16)
    free(dev)
    return model


def build_bnb_4bit(dims: dict, dev: torch.device):
    """The bf16 model, each decoder linear layer replaced by bitsandbytes' NF4 + double quant."""
    import bitsandbytes as bnb

    model = build_bf16(dims, dev)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, mod in list(parent.named_children()):
                if isinstance(mod, nn.Linear):
                    q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=False,
                                          compute_dtype=torch.bfloat16, quant_type="nf4",
                                          compress_statistics=True, device="meta")
                    q.weight = bnb.nn.Params4bit(mod.weight.data, requires_grad=False,
                                                 quant_type="nf4", compress_statistics=True)
                    setattr(parent, name, q.to(dev))
                    del mod
    free(dev)
    model.is_loaded_in_4bit = True
    return model


@torch.no_grad()
def fill_lora_A(path: str, a: torch.Tensor) -> None:
    """A by module path (kaiming-uniform bound 1/sqrt(fan_in)), identical in both libraries."""
    g = torch.Generator().manual_seed(zlib.crc32(path.encode()))
    bound = 1.0 / math.sqrt(a.shape[1])
    a.copy_(torch.empty(a.shape).uniform_(-bound, bound, generator=g).to(a.dtype))


# ------------------------------------------------------------------ the two trainers
def ours(model, adapter_dtype: str, fused: bool, offload: bool, liger: bool, dev):
    """loratune: add_adapter, the chunked labelled-only loss the loop uses, the levers."""
    from loratune.adapters import AdaptedLinear, add_adapter
    from loratune.adapters.fused_lora import set_fused_lora
    from loratune.config import LoraConfig, TrainConfig
    from loratune.train.loop import set_checkpointing
    from loratune.train.loss import causal_lm_loss
    from loratune.train.offload import activation_offload
    from loratune.train.optim import build_optimizer

    add_adapter(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear",
                                  dtype=adapter_dtype), "default")
    for path, mod in model.named_modules():
        if isinstance(mod, AdaptedLinear):
            fill_lora_A(path, mod.adapters["default"].lora_A)
    set_fused_lora(model, fused)
    if liger:
        from loratune.models.kernels import use_fused_kernels

        use_fused_kernels(model, dev)
    set_checkpointing(model, True)
    opt = build_optimizer(model, TrainConfig(lr=LR))
    model.train()

    def step(batch):
        with activation_offload(offload, dev, model):
            total, n = causal_lm_loss(model, batch)
        loss = total / max(n, 1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def peft(model, adapter_dtype: str):
    """PEFT LoRA on the same base; fp32 adapters are its default (autocast_adapter_dtype)."""
    import peft as peft_lib

    if getattr(model, "is_loaded_in_4bit", False):
        model = peft_lib.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    cfg = peft_lib.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                              target_modules="all-linear", task_type="CAUSAL_LM")
    pm = peft_lib.get_peft_model(model, cfg, autocast_adapter_dtype=adapter_dtype == "float32")
    for name, mod in pm.named_modules():
        a = getattr(mod, "lora_A", None)
        if isinstance(a, nn.ModuleDict) and "default" in a:
            fill_lora_A(name.removeprefix("base_model.model."), a["default"].weight)
    pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pm.config.use_cache = False
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=LR)
    pm.train()

    def step(batch):
        loss = pm(**batch, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


# ------------------------------------------------------------------ batches and timing
def random_batch(vocab: int, rows: int, seq: int, dev, docs: int = 1) -> dict:
    """Random tokens, every position labelled; docs > 1: packed rows (position_ids restart)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (rows, seq), generator=g)
    batch = {"input_ids": ids.to(dev), "labels": ids.clone().to(dev)}
    if docs > 1:
        pos = torch.arange(seq) % (seq // docs)
        batch["position_ids"] = pos.repeat(rows, 1).to(dev)
    return batch


def time_steps(bench: Bench, step, batch) -> tuple[float, list[float], float | None]:
    dev = bench.device
    losses = []
    for _ in range(bench.warmup):
        losses.append(step(batch))
    reset_peak(dev)
    t0 = time.perf_counter()
    for _ in range(bench.steps):
        losses.append(step(batch))
    sync(dev)
    ms = (time.perf_counter() - t0) / bench.steps * 1e3
    return ms, [float(x) for x in losses], peak_gib(dev)


def run_row(bench: Bench, row: Row, make) -> None:
    """Build with `make()` -> (step, batch); time it; record the row or why it was skipped."""
    bench.rows.append(row)
    if bench.over_budget():
        row.note = "skipped: time budget spent"
        print(format_row(row, bench.rows), flush=True)
        return
    free(bench.device)
    try:
        step, batch = make()
        row.ms, row.losses, row.peak_gib = time_steps(bench, step, batch)
    except Exception as err:  # one failing row must not lose the others
        row.note = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
        traceback.print_exc()
    finally:
        step = batch = None
        free(bench.device)
    print(format_row(row, bench.rows), flush=True)


# ------------------------------------------------------------------ the rows
def lora_rows(bench: Bench, shape: str, dims: dict, rows: int, seq: int, liger: bool,
              dtype: str) -> None:
    """PEFT, then ours plain and with each lever, all with `dtype` adapters (base or float32)."""
    dev = bench.device
    tag = "bf16" if dtype == "base" else "fp32"

    def peft_row():
        return peft(build_bf16(dims, dev), dtype), random_batch(dims["vocab_size"], rows, seq,
                                                               dev)
    run_row(bench, Row("lora", shape, f"{rows}x{seq}", "PEFT", tag), peft_row)
    levers = [(False, False, False), (True, False, False), (True, True, False)]
    if liger:
        levers.append((True, False, True))
    if tag == "fp32":
        levers = levers[:2]
    for fused, offload, lig in levers:
        name = "+".join(n for n, on in (("fused", fused), ("offload", offload),
                                        ("liger", lig)) if on) or "plain"

        def ours_row(fused=fused, offload=offload, lig=lig):
            step = ours(build_bf16(dims, dev), dtype, fused, offload, lig, dev)
            return step, random_batch(dims["vocab_size"], rows, seq, dev)
        run_row(bench, Row("lora", shape, f"{rows}x{seq}", "loratune", tag, name), ours_row)


def qlora_rows(bench: Bench, shape: str, dims: dict, seq: int, batches: list[int]) -> None:
    import importlib.util

    dev = bench.device
    have_bnb = importlib.util.find_spec("bitsandbytes") is not None
    for rows in batches:
        def bnb_row(rows=rows):
            return (peft(build_bnb_4bit(dims, dev), "float32"),
                    random_batch(dims["vocab_size"], rows, seq, dev))
        if have_bnb:
            run_row(bench, Row("qlora", shape, f"{rows}x{seq}", "PEFT+bnb", "fp32"), bnb_row)
        else:
            bench.rows.append(Row("qlora", shape, f"{rows}x{seq}", "PEFT+bnb", "fp32",
                                  note="skipped: bitsandbytes not importable"))
        for fused in (False, True):
            def ours_row(rows=rows, fused=fused):
                step = ours(build_ours_4bit(dims, dev), "float32", fused, False, False, dev)
                return step, random_batch(dims["vocab_size"], rows, seq, dev)
            run_row(bench, Row("qlora", shape, f"{rows}x{seq}", "loratune", "fp32",
                               "fused" if fused else "plain"), ours_row)


def packed_rows(bench: Bench, shape: str, dims: dict, rows: int, seq: int, docs: int) -> None:
    """model.packed_attention: mask (dense block mask under sdpa) vs flex vs varlen."""
    from loratune.models.attention import AttentionError, packed_backend, use_packed_attention

    dev = bench.device
    for choice in ("mask", "flex", "varlen"):
        row = Row("packed", shape, f"{rows}x{seq}/{docs} docs", "loratune", "bf16",
                  f"fused, packed_attention={choice}")
        try:
            backend, note = packed_backend(choice, dev, True)
        except AttentionError as err:
            backend, note = None, str(err)
        if backend is None and choice != "mask":
            row.note = f"skipped: {note}"
            bench.rows.append(row)
            print(format_row(row, bench.rows), flush=True)
            continue

        def make(choice=choice):
            model = build_bf16(dims, dev)
            use_packed_attention(model, choice, dev, True)
            step = ours(model, "base", True, False, False, dev)
            return step, random_batch(dims["vocab_size"], rows, seq, dev, docs=docs)
        run_row(bench, row, make)


# ------------------------------------------------------------------ output
def peer(row: Row, rows: list[Row]) -> Row | None:
    """The PEFT row this one is compared with: same group, shape, batch and adapter dtype."""
    if row.group == "packed":
        return next((r for r in rows if r.group == "packed" and r.shape == row.shape
                     and r.levers.endswith("=mask")), None)
    return next((r for r in rows if r.who.startswith("PEFT") and r.group == row.group
                 and r.shape == row.shape and r.batch == row.batch
                 and (r.adapters == row.adapters or row.group == "qlora")), None)


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


HEADER = ("| group | shape | batch | who | adapters | levers | ms/step | x peer | peak GiB | "
          "x peer | loss first -> last | note |\n|" + "---|" * 12)


def format_row(row: Row, rows: list[Row]) -> str:
    p = peer(row, rows)
    p = None if p is row else p
    loss = f"{row.losses[0]:.4f} -> {row.losses[-1]:.4f}" if row.losses else "-"
    return (f"| {row.group} | {row.shape} | {row.batch} | {row.who} | {row.adapters} | "
            f"{row.levers} | {fmt(row.ms, '.1f')} | {ratio(row.ms, p and p.ms)} | "
            f"{fmt(row.peak_gib, '.2f')} | {ratio(row.peak_gib, p and p.peak_gib)} | {loss} | "
            f"{row.note} |")


def environment(dev: torch.device) -> dict:
    import importlib.metadata as md

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    env = {k: version(k) for k in ("torch", "transformers", "peft", "bitsandbytes",
                                   "liger-kernel", "flash-attn", "triton")}
    env["device"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes on CPU")
    ap.add_argument("--device", default=None, help="default: cuda, or cpu with --quick")
    ap.add_argument("--budget-s", type=float, default=450.0)
    ap.add_argument("--out", default=None, help="folder for gpu_train.json")
    ap.add_argument("--only", default="lora,qlora,packed", help="groups to run")
    args = ap.parse_args(argv)
    dev = torch.device(args.device or ("cpu" if args.quick else "cuda"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("gpu_train.py: no CUDA device here; run with --quick for the CPU smoke run")
        return 2
    bench = Bench(dev, warmup=1 if args.quick else 2, steps=2 if args.quick else 3,
                  budget_s=args.budget_s)
    small, big = ("tiny-1b", "tiny-8b") if args.quick else ("1b", "8b")
    seq = 64 if args.quick else 2048
    import importlib.util

    liger = dev.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None
    env = environment(dev)
    print(json.dumps(env))
    print(HEADER)
    groups = args.only.split(",")
    # The table first (8B, equal adapter dtype; QLoRA 1x2048), so a spent budget
    # skips the rows that matter least.
    plan = [("lora", lambda: lora_rows(bench, big, SHAPES[big], 4, seq, liger, "base")),
            ("qlora", lambda: qlora_rows(bench, big, SHAPES[big], seq, [1])),
            ("lora", lambda: lora_rows(bench, small, SHAPES[small], 4, seq, liger, "base")),
            ("qlora", lambda: qlora_rows(bench, big, SHAPES[big], seq, [2])),
            ("lora", lambda: lora_rows(bench, big, SHAPES[big], 4, seq, liger, "float32")),
            ("lora", lambda: lora_rows(bench, small, SHAPES[small], 4, seq, liger, "float32")),
            ("packed", lambda: packed_rows(bench, small, SHAPES[small], 4, seq, docs=8))]
    for group, run in plan:
        if group in groups:
            run()
    print(f"\n{len(bench.rows)} rows in {time.monotonic() - bench.t0:.0f} s on {env['device']}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_train.json").write_text(json.dumps(
            {"env": env, "rows": [asdict(r) for r in bench.rows]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
