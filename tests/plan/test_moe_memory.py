"""The planner's MoE figures against measured memory: peak RSS of two training steps of a
random-init Qwen3-MoE (6 layers: experts 288 MiB in fp32; QLoRA 2 layers), LoRA on attention
and on every routed expert, with the experts in fp32 (LoRA) or in NF4 (QLoRA), each in its own
process (benchmarks/moe_memory.py), and the Qwen3-30B-A3B preset the README quotes."""

import importlib.util
from pathlib import Path

import pytest

from loratune.plan.memory import Setup, estimate
from loratune.plan.shapes import PRESETS, QWEN3_30B_A3B, ModelShape, resolve_shape

GiB = 2**30
SCRIPT = Path(__file__).parents[2] / "benchmarks" / "moe_memory.py"


def benchmark():
    spec = importlib.util.spec_from_file_location("moe_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("quant", [False, True], ids=["lora", "qlora"])
def test_moe_estimate_within_15_percent_of_a_measured_step(quant):
    """Weights, per-expert adapters and their AdamW states, activations per active expert and
    the runtime, summed by the planner from the model's config, against the kernel's peak."""
    bench = benchmark()
    # QLoRA: 2 layers (the 4-bit experts' CPU step is slow; their weights are small anyway)
    layers = 2 if quant else 6
    run = bench.measure("qwen3_moe", quant, batch=1, seq=512, layers=layers)
    planned = bench.planned("qwen3_moe", run["method"], 1, 512, layers)
    measured = run["step_peak_gib"] * GiB
    assert 0.85 < planned.total / measured < 1.15, (planned.as_dict(), run)


def test_the_qwen3_30b_a3b_preset_is_its_config():
    """`loratune plan --model qwen3-30b-a3b` (the README's line) plans the config.json's shape:
    18.9 GiB for QLoRA r=16, bf16, batch 1 x 2048, checkpointing (docs/memory-planner.md)."""
    shape = resolve_shape("qwen3-30b-a3b")
    assert shape == PRESETS["qwen3-30b-a3b"]
    assert shape == ModelShape.from_hf_config(QWEN3_30B_A3B, "qwen3-30b-a3b")
    total = estimate(shape, Setup(method="qlora", rank=16, seq=2048, dtype="bf16")).total
    assert round(total / GiB, 1) == 18.9
