"""Adapters on a bf16 base: fp32 trainable weights by default (`adapter.dtype: float32`), so
AdamW's small steps are kept; `adapter.dtype: base` keeps them in bf16, where they round away."""

import pytest
import torch

from loratune.adapters import (add_adapter, load_adapter, merge_and_unload, save_adapter,
                               trainable_parameters)
from loratune.adapters.inject import adapter_config
from loratune.config import adapter_config_from
from loratune.train.loss import causal_lm_loss
from tiny import tiny_llama

IDS = torch.tensor([[3, 7, 11, 2, 64, 99, 5, 17], [9, 8, 7, 6, 5, 4, 3, 2]])
BATCH = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS), "labels": IDS}

# method -> options. Dense MoE routing, no pruning schedule: every value gets a gradient.
METHODS = {
    "lora": {"r": 4},
    "dora": {"r": 4},
    "ia3": {},
    "prompt": {"num_virtual_tokens": 4},
    "prefix": {"num_virtual_tokens": 4},
    "bottleneck": {"bottleneck_size": 8, "nonlinearity": "tanh"},  # ReLU: dead units get no grad
    "moe_lora": {"r": 4, "num_experts": 2},
    "adalora": {"init_r": 4, "target_r": 2},
}


def bf16_model(method: str, dtype: str = "float32", **extra):
    model = tiny_llama().to(torch.bfloat16)
    add_adapter(model, adapter_config_from({"method": method, "dtype": dtype,
                                            **METHODS[method], **extra}))
    return model


def train_steps(model, steps: int = 3, lr: float = 1e-3) -> dict[str, torch.Tensor]:
    """AdamW steps on a fixed batch; returns the trainable tensors before training."""
    params = trainable_parameters(model)
    before = {n: p.detach().clone() for n, p in params}
    opt = torch.optim.AdamW([p for _, p in params], lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss, n = causal_lm_loss(model, BATCH)
        (loss / n).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return before


def changed(model, before) -> dict[str, float]:
    """Trainable tensor name -> share of its values that moved."""
    live = dict(trainable_parameters(model))
    return {n: (live[n].detach() != t).float().mean().item() for n, t in before.items()}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_adapter_tensor_trains_on_a_bf16_base(method):
    model = bf16_model(method)
    params = trainable_parameters(model)
    assert params and all(p.dtype == torch.float32 for _, p in params), \
        {n: p.dtype for n, p in params}
    base = [p for p in model.parameters() if not p.requires_grad]
    assert all(p.dtype == torch.bfloat16 for p in base)  # the base is untouched
    before = train_steps(model)
    moved = changed(model, before)
    assert all(share > 0.9 for share in moved.values()), moved
    # The output crosses back into the base's dtype.
    with torch.no_grad():
        assert model(input_ids=IDS).logits.dtype == torch.bfloat16


def test_adapter_dtype_base_keeps_bf16_and_loses_ia3_updates():
    """Why the default is fp32: an IA³ scale at 1.0 does not move in bf16 (step 1e-3 < 2^-8)."""
    model = bf16_model("ia3", dtype="base")
    params = trainable_parameters(model)
    assert all(p.dtype == torch.bfloat16 for _, p in params)
    moved = changed(model, train_steps(model))
    assert all(share == 0.0 for share in moved.values()), moved


def test_modules_to_save_copy_trains_in_fp32_and_unloads_in_bf16():
    model = bf16_model("lora", modules_to_save=["lm_head"])
    copy = model.lm_head.copies["default"]
    assert copy.weight.dtype == torch.float32 and model.lm_head.original.weight.dtype == \
        torch.bfloat16
    moved = changed(model, train_steps(model))
    assert moved["lm_head.copies.default.weight"] > 0.9, moved
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
        plain = merge_and_unload(model)
        assert plain.lm_head.weight.dtype == torch.bfloat16
        torch.testing.assert_close(plain(input_ids=IDS).logits, expected, atol=0.1, rtol=0.02)


def test_the_switch_is_typed_and_never_written_to_files(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        adapter_config_from({"method": "lora", "dtype": "bfloat16"})
    model = bf16_model("bottleneck", dtype="base")
    folder = save_adapter(model, tmp_path / "a")
    assert '"dtype"' not in (folder / "adapter_config.json").read_text()
    fresh = tiny_llama().to(torch.bfloat16)
    load_adapter(fresh, folder)  # a file loads with the default: fp32 weights
    assert adapter_config(fresh, "default").dtype == "float32"
    assert all(p.dtype == torch.float32 for _, p in trainable_parameters(fresh))


@pytest.mark.parametrize("method", ["lora", "ia3", "dora"])
def test_fp32_adapter_on_bf16_base_saves_reloads_and_merges(tmp_path, method):
    model = bf16_model(method)
    train_steps(model, lr=2e-2)
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    folder = save_adapter(model, tmp_path / method)
    from safetensors.torch import load_file
    assert {t.dtype for t in load_file(folder / "adapter_model.safetensors").values()} == \
        {torch.float32}
    fresh = tiny_llama().to(torch.bfloat16)
    load_adapter(fresh, folder)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=IDS).logits, expected, atol=0, rtol=0)
        merged = merge_and_unload(fresh)
        assert all(p.dtype == torch.bfloat16 for p in merged.parameters())
        # The merge rounds W + ΔW to bf16 once: logits agree to bf16's resolution.
        torch.testing.assert_close(merged(input_ids=IDS).logits, expected, atol=0.1, rtol=0.02)


def test_peft_loads_our_fp32_file_onto_a_bf16_base(tmp_path):
    peft = pytest.importorskip("peft")
    model = bf16_model("lora")
    train_steps(model, lr=2e-2)
    folder = save_adapter(model, tmp_path / "a")
    with torch.no_grad():
        ours = model(input_ids=IDS).logits.float()
        theirs = peft.PeftModel.from_pretrained(tiny_llama().to(torch.bfloat16), folder)
        assert theirs.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"] \
            .weight.dtype == torch.float32  # PEFT's own default on a bf16 base
        torch.testing.assert_close(theirs(input_ids=IDS).logits.float(), ours, atol=0.1,
                                   rtol=0.02)
