"""model.packed_attention: which backend packed rows get, and flex_attention's document mask
giving the dense mask's logits (forward only: torch 2.13 has no flex backward on CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loratune.models.attention import AttentionError, packed_backend

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def test_backend_choice():
    assert packed_backend("mask", CUDA, True) == (None, None)
    assert packed_backend("flex", CUDA, False) == (None, None)  # nothing packed: unchanged
    assert packed_backend("flex", CUDA, True, flash=False)[0] == "flex_attention"
    assert packed_backend("varlen", CUDA, True, flash=True)[0] == "flash_attention_2"
    assert packed_backend("auto", CUDA, True, flash=True)[0] == "flash_attention_2"
    assert packed_backend("auto", CUDA, True, flash=False)[0] == "flex_attention"
    assert packed_backend("auto", CPU, True) == (None, None)
    backend, note = packed_backend("flex", CPU, True)
    assert backend is None and "falls back to the dense block mask on cpu" in note
    assert "no backward on CPU" in note
    assert "CUDA only" in packed_backend("varlen", CPU, True, flash=True)[1]
    with pytest.raises(AttentionError, match="varlen needs the flash-attn package"):
        packed_backend("varlen", CUDA, True, flash=False)
    with pytest.raises(AttentionError, match="model.packed_attention 'dense'"):
        packed_backend("dense", CUDA, True)


CHECK = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from tiny import tiny_llama
model = tiny_llama().float()
ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
pos = torch.cat([torch.arange(10), torch.arange(9), torch.arange(5)]).repeat(2, 1)
masks = []
model.model.layers[0].self_attn.register_forward_pre_hook(
    lambda m, a, kw: masks.append(type(kw.get("attention_mask")).__name__), with_kwargs=True)
logits = {}
with torch.no_grad():
    for backend in ("sdpa", "flex_attention"):
        model.set_attn_implementation(backend)
        logits[backend] = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    model.set_attn_implementation("sdpa")
    alone = torch.cat([model(input_ids=ids[:, a:b]).logits
                       for a, b in ((0, 10), (10, 19), (19, 24))], dim=1)
print(json.dumps({"masks": masks[:2],
                  "flex_vs_mask": float((logits["flex_attention"] - logits["sdpa"]).abs().max()),
                  "flex_vs_alone": float((logits["flex_attention"] - alone).abs().max()),
                  "scale": float(alone.abs().max())}))
"""


def test_flex_document_mask_equals_the_dense_mask_on_packed_rows():
    # TORCHDYNAMO_DISABLE: transformers compiles flex_attention, ~60 s on this CPU; uncompiled
    # it runs torch's reference implementation of the same masked attention.
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1"}
    tests = str(Path(__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, "-c", CHECK, tests], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["masks"] == ["Tensor", "BlockMask"]  # dense [rows,1,q,k] vs flex's block mask
    assert got["scale"] > 0.1
    assert got["flex_vs_mask"] < 1e-5 and got["flex_vs_alone"] < 1e-5, got


def test_training_on_cpu_says_flex_falls_back(tmp_path, data_file, smol_tokenizer, capsys):
    from loratune.config import build_config
    from loratune.train import train
    from tiny import tiny_llama

    cfg = build_config({"output_dir": str(tmp_path / "run"),
                        "model": {"packed_attention": "flex"},
                        "adapter": {"r": 2, "target_modules": ["q_proj"]},
                        "data": {"train": str(data_file), "packing": True, "max_length": 64},
                        "train": {"max_steps": 1, "batch_size": 2}})
    model = tiny_llama(vocab=len(smol_tokenizer))
    train(cfg, model=model, tokenizer=smol_tokenizer)
    assert "packed_attention: flex falls back to the dense block mask on cpu" in capsys.readouterr().out
    assert model.config._attn_implementation == "eager"  # tiny_llama's own, left alone


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex_attention's backward and "
                    "FlashAttention need CUDA; no GPU here")
def test_flex_training_step_equals_the_dense_mask_on_cuda():
    from loratune.adapters import add_adapter
    from loratune.config import LoraConfig
    from loratune.models.attention import use_packed_attention
    from tiny import randomize_lora

    ids = torch.randint(0, 128, (2, 24), device="cuda")
    pos = torch.cat([torch.arange(10), torch.arange(14)]).repeat(2, 1).cuda()
    results = {}
    from transformers import LlamaConfig, LlamaForCausalLM

    for choice in ("mask", "flex"):
        torch.manual_seed(0)  # head_dim 16: flex's kernels want at least 16
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")).cuda()
        assert use_packed_attention(model, choice, torch.device("cuda"), True) == (
            None if choice == "mask" else "packed rows attend through flex_attention "
            "(no dense mask)")
        add_adapter(model, LoraConfig(r=2), "default")
        randomize_lora(model)
        loss = model(input_ids=ids, position_ids=pos, labels=ids, use_cache=False).loss
        loss.backward()
        results[choice] = (float(loss.detach()), {n: p.grad.clone() for n, p in
                                                  model.named_parameters() if p.requires_grad})
    assert results["flex"][0] == pytest.approx(results["mask"][0], abs=1e-5)
    for k, g in results["mask"][1].items():
        torch.testing.assert_close(results["flex"][1][k], g, atol=1e-5, rtol=1e-4, msg=k)
