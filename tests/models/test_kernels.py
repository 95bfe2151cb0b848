"""model.fused_kernels: the norm/MLP swap keeps weights, keys and adapters and gives the plain
path's numbers (checked on CPU with PyTorch stand-ins for the kernels; liger-kernel itself on
CUDA only: its Triton kernels do not run under Triton's CPU interpreter)."""

import pytest
import torch
import torch.nn.functional as F

from loratune.adapters import add_adapter
from loratune.config import LoraConfig
from loratune.models.kernels import (FusedRMSNorm, FusedSwiGLU, KernelError, swap_fused_modules,
                                     use_fused_kernels)
from tiny import randomize_lora, tiny_llama

calls = {"norm": 0, "silu_mul": 0}


def rms_norm(x, weight, eps):  # Llama's formula, counted
    calls["norm"] += 1
    var = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(var + eps)).to(x.dtype)


def silu_mul(gate, up):
    calls["silu_mul"] += 1
    return F.silu(gate) * up


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids).loss
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()
                                  if p.requires_grad}


def test_swap_keeps_keys_and_adapters_and_equals_the_plain_path():
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    plain = tiny_llama()
    add_adapter(plain, LoraConfig(r=2), "default")
    randomize_lora(plain)
    fused = tiny_llama()
    keys = list(fused.state_dict())
    done = swap_fused_modules(fused, rms_norm, silu_mul)
    assert done == {"swapped": 2 * 3 + 1, "left": {}}  # 2 norms + 1 MLP per layer, final norm
    assert list(fused.state_dict()) == keys  # same weights under the same names
    assert isinstance(fused.model.layers[1].mlp, FusedSwiGLU)
    assert isinstance(fused.model.norm, FusedRMSNorm)
    add_adapter(fused, LoraConfig(r=2), "default")  # finds mlp.gate_proj ... as before
    randomize_lora(fused)
    calls.update(norm=0, silu_mul=0)
    loss_f, grads_f = _loss_and_grads(fused, ids)
    assert calls == {"norm": 5, "silu_mul": 2}
    loss_p, grads_p = _loss_and_grads(plain, ids)
    assert loss_f == pytest.approx(loss_p, abs=1e-6) and len(grads_f) == len(grads_p) == 28
    for k in grads_p:
        torch.testing.assert_close(grads_f[k], grads_p[k], atol=1e-6, rtol=1e-5, msg=k)


def test_other_architectures_are_left_and_named():
    from transformers import GemmaConfig, GemmaForCausalLM

    model = GemmaForCausalLM(GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, head_dim=16))
    done = swap_fused_modules(model, rms_norm, silu_mul)
    assert done["swapped"] == 0 and done["left"] == {"GemmaRMSNorm": 3, "GemmaMLP": 1}


def test_cpu_runs_the_plain_path_and_says_so():
    model = tiny_llama()
    notes = use_fused_kernels(model, torch.device("cpu"))
    assert notes == ["model.fused_kernels: liger-kernel's kernels need CUDA; the plain PyTorch "
                     "RMSNorm/SwiGLU run on cpu"]
    assert type(model.model.norm).__name__ == "LlamaRMSNorm"


def test_cuda_without_liger_names_the_extra(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(KernelError, match=r"loratune\[liger\]"):
        use_fused_kernels(tiny_llama(), torch.device("cuda"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="liger-kernel's Triton kernels need "
                    "CUDA (they do not run under Triton's CPU interpreter); no GPU here")
def test_liger_kernels_equal_the_plain_path_on_cuda():
    pytest.importorskip("liger_kernel", reason="model.fused_kernels needs loratune[liger]")
    ids = torch.randint(0, 128, (2, 12), device="cuda")
    plain, fused = tiny_llama().cuda(), tiny_llama().cuda()
    for m in (plain, fused):
        add_adapter(m, LoraConfig(r=2), "default")
        randomize_lora(m)
    assert use_fused_kernels(fused, torch.device("cuda"))[0].startswith(
        "model.fused_kernels: 7 norms")
    loss_f, grads_f = _loss_and_grads(fused, ids)
    loss_p, grads_p = _loss_and_grads(plain, ids)
    assert loss_f == pytest.approx(loss_p, abs=1e-5)
    for k in grads_p:
        torch.testing.assert_close(grads_f[k], grads_p[k], atol=1e-5, rtol=1e-4, msg=k)


def test_training_with_fused_kernels_on_cpu_logs_the_note(tmp_path, data_file, smol_tokenizer,
                                                          capsys):
    from loratune.config import build_config
    from loratune.train import train

    cfg = build_config({"output_dir": str(tmp_path / "run"), "model": {"fused_kernels": True},
                        "adapter": {"r": 2, "target_modules": ["q_proj"]},
                        "data": {"train": str(data_file), "max_length": 48},
                        "train": {"max_steps": 1, "batch_size": 2}})
    train(cfg, model=tiny_llama(vocab=len(smol_tokenizer)), tokenizer=smol_tokenizer)
    assert "model.fused_kernels: liger-kernel's kernels need CUDA" in capsys.readouterr().out
