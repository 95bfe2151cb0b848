"""Memory planner: parameter counts against real transformers models, the shape of the model."""

import pytest
import torch
from dataclasses import replace

from loratune.cli import main
from loratune.plan import GPUS, PRESETS, Setup, estimate, parse_memory, recommend, resolve_shape
from loratune.plan.recommend import GiB, largest_batch
from loratune.plan.shapes import ModelShape


def meta_model(shape: ModelShape):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                      num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                      num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab,
                      tie_word_embeddings=shape.tie_embeddings)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("name", ["llama-2-7b", "smollm2-135m-instruct"])
def test_counts_equal_a_real_model(name):
    shape = PRESETS[name]
    model = meta_model(shape)
    assert shape.params == sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings()
    lora = sum(16 * (m.in_features + m.out_features) for m in model.modules()
               if isinstance(m, torch.nn.Linear) and m is not head)
    assert shape.lora_params(16) == lora


def test_public_figures_for_7b():
    shape = resolve_shape("7b")
    assert shape.params * 2 / GiB == pytest.approx(12.55, abs=0.05)  # bf16 weights
    assert shape.lora_params(16) == pytest.approx(40e6, rel=0.01)
    q = estimate(shape, Setup(method="qlora", batch=1, seq=512))
    assert 3.5 * GiB < q.weights + q.quant_stats < 4.3 * GiB
    assert 5 * GiB < q.total < 7 * GiB  # the seeds: ~5.8 GB on an 8 GB card
    full = estimate(shape, Setup(method="full", batch=1, seq=512))
    assert full.total > 80e9  # 16 bytes per parameter with AdamW in mixed precision


def test_ordering_and_monotonicity():
    shape = PRESETS["llama-2-13b"]
    base = Setup(batch=2, seq=512)
    totals = [estimate(shape, replace(base, method=m)).total for m in ("qlora", "lora", "full")]
    assert totals == sorted(totals)
    with_ckpt = estimate(shape, base).activations
    without = estimate(shape, replace(base, checkpointing=False)).activations
    assert with_ckpt < without / 5
    assert estimate(shape, replace(base, batch=4)).total > estimate(shape, base).total
    assert estimate(shape, replace(base, seq=1024)).total > estimate(shape, base).total
    eight = estimate(shape, replace(base, optimizer="adamw8bit")).optimizer
    assert eight < 0.3 * estimate(shape, base).optimizer


def test_recommended_batch_is_the_largest_that_fits():
    shape, memory = PRESETS["llama-2-7b"], parse_memory("rtx4090")[1]
    setup = Setup(method="qlora", seq=1024, checkpointing=False)
    b = largest_batch(shape, setup, memory)
    assert b >= 1
    assert estimate(shape, replace(setup, batch=b)).total <= memory
    assert estimate(shape, replace(setup, batch=b + 1)).total > memory
    advice = recommend(shape, setup, memory, target_batch=32)
    assert advice and all(a.total <= memory for a in advice)
    assert all(a.setup.batch * a.grad_accum >= 32 for a in advice)
    assert recommend(PRESETS["llama-2-70b"], Setup(method="lora"), memory) == []


def test_gpu_parsing():
    assert parse_memory("24GB")[1] == 24 * 10**9
    assert parse_memory("rtx4090")[1] == 24 * 2**30
    assert parse_memory("24GiB")[1] == 24 * 2**30
    assert parse_memory("12g")[1] == 12 * 10**9
    assert parse_memory("RTX4090")[1] == GPUS["rtx4090"][1]
    with pytest.raises(ValueError, match="--gpu 'lots'"):
        parse_memory("lots")


def test_shape_from_a_config_folder(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4, vocab_size=100).save_pretrained(tmp_path)
    shape = resolve_shape(str(tmp_path))
    assert (shape.hidden, shape.layers, shape.kv_heads) == (64, 3, 4)
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text('{"n_embd": 768, "n_layer": 12}')
    with pytest.raises(ValueError, match="gpt2: config has no hidden_size"):
        resolve_shape(str(tmp_path / "gpt2"))


def test_cli(capsys):
    assert main(["plan", "--model", "7b", "--method", "qlora", "--gpu", "rtx3060"]) == 0
    out = capsys.readouterr().out
    assert "fits on RTX 3060 12 GB" in out and "micro-batch" in out and "activations" in out
    assert main(["plan", "--table"]) == 0
    table = capsys.readouterr().out
    assert "llama-2-70b" in table and table.count("qlora") == 3
    assert main(["plan", "--model", "gpt-9"]) == 2
    assert "unknown model 'gpt-9'" in capsys.readouterr().err


@pytest.mark.slow
def test_estimate_within_15_percent_of_a_measured_qlora_step():
    """One QLoRA step of the embedded model in its own process: peak RSS vs the planner."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[2] / "benchmarks" / "qlora_memory.py"
    out = subprocess.run([sys.executable, str(script), "--worker", "--shape", "small",
                          "--batch", "1", "--seq", "256", "--steps", "1"],
                         capture_output=True, text=True, check=True)
    measured = json.loads(out.stdout.strip().splitlines()[-1])["step_peak_gib"] * GiB
    planned = estimate(PRESETS["smollm2-135m-instruct"], Setup(
        method="qlora", batch=1, seq=256, dtype="fp32", checkpointing=True, loss_chunk=256,
        device="cpu")).total
    assert 0.85 < planned / measured < 1.15, (planned / GiB, measured / GiB)


def test_data_parallel_per_gpu():
    """DDP keeps the whole base on every GPU; FSDP divides it (not the 4-bit base)."""
    shape = PRESETS["llama-2-70b"]
    one = estimate(shape, Setup(method="lora", seq=512))
    ddp = estimate(shape, Setup(method="lora", seq=512, gpus=8, parallel="ddp"))
    fsdp = estimate(shape, Setup(method="lora", seq=512, gpus=8, parallel="fsdp"))
    assert ddp.weights == one.weights and ddp.communication == one.grads  # bucket copy
    layer = sum(a * b for a, b in shape.linear_shapes())
    assert fsdp.weights == -(-one.weights // 8) + (shape.other_params + 2 * layer) * 2
    assert fsdp.optimizer == -(-one.optimizer // 8) and fsdp.grads == -(-one.grads // 8)
    h100 = GPUS["h100"][1]
    assert ddp.total > h100 and fsdp.total < 0.3 * h100  # 70B LoRA: 8 x H100 only with FSDP
    totals = [estimate(shape, Setup(method="lora", gpus=n, parallel="fsdp")).total
              for n in (2, 4, 8)]
    assert totals == sorted(totals, reverse=True)
    q1 = estimate(shape, Setup(method="qlora"))
    q8 = estimate(shape, Setup(method="qlora", gpus=8, parallel="fsdp"))
    # 4-bit codes and scales sharded too, plus the fp32 root and two gathered layers
    gathered = 4 * shape.other_params + 2 * (layer // 2 + -(-q1.quant_stats // shape.layers))
    assert q8.weights == -(-q1.weights // 8) + gathered
    assert q8.quant_stats == -(-q1.quant_stats // 8)
    with pytest.raises(ValueError, match="parallel 'zero'"):
        Setup(parallel="zero")
    with pytest.raises(ValueError, match="gpus 0"):
        Setup(gpus=0)
    advice = recommend(PRESETS["llama-2-7b"], Setup(method="lora", gpus=4, parallel="fsdp"),
                       parse_memory("rtx4090")[1], target_batch=6)
    assert advice and all(a.grad_accum % 4 == 0 for a in advice)


def test_plan_cli_scaling(capsys):
    assert main(["plan", "--scaling"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("llama-2-70b") and
               " lora " in line and "fsdp" in line).split()
    per_gpu = [float(x) for x in row[3:]]
    assert per_gpu == sorted(per_gpu, reverse=True) and per_gpu[-1] < per_gpu[0] / 4
    assert main(["plan", "--model", "7b", "--gpus", "4", "--parallel", "fsdp"]) == 0
    assert "per GPU of 4 (fsdp, base sharded)" in capsys.readouterr().out


def test_plan_answers_for_the_configured_device(capsys, monkeypatch):
    """device cpu: this machine's RAM, no CUDA context row, no GPU table; a GPU only when
    asked with --gpu (issue 24: 'fits on RTX 3060' for a CPU config)."""
    from loratune.plan import report

    monkeypatch.setattr(report, "host_memory", lambda: (16 * 2**30, 9 * 2**30))
    assert main(["plan", "--model", "smollm2-135m-instruct", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "CUDA" not in out and "RTX" not in out and "A100" not in out
    assert "runtime (python, torch)" in out
    total = float(next(x for x in out.splitlines() if x.strip().startswith("total")).split()[1])
    assert out.splitlines()[-1] == (f"fits in this machine's RAM: {total:.2f} of 16.00 GiB; "
                                    "9.00 GiB available now")
    monkeypatch.setattr(report, "host_memory", lambda: (2**29, None))
    assert main(["plan", "--model", "7b", "--device", "cpu"]) == 0
    assert "does not fit in this machine's RAM:" in capsys.readouterr().out
    assert main(["plan", "--model", "7b", "--device", "cpu", "--gpu", "rtx3060"]) == 0
    assert "on RTX 3060 12 GB" in capsys.readouterr().out


def test_plan_for_a_gpu_run_lists_no_gpu_table_unless_asked(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["plan", "--model", "7b", "--method", "qlora"]) == 0
    out = capsys.readouterr().out
    assert "RTX" not in out and "runtime / CUDA context" in out
    assert out.splitlines()[-1].startswith("no GPU here: --gpu NAME or SIZE says whether it fits")


def test_host_memory_is_this_machines():
    from loratune.plan.report import host_memory

    total, available = host_memory()
    assert total > 2**28 and (available is None or 0 < available <= total)
