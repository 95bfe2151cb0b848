import math

import pytest
import torch
from torch import nn

from loratune.adapters import (
    AdaptedLinear,
    AdapterError,
    LoraAdapter,
    SavedModule,
    add_adapter,
    adapter_names,
    delete_adapter,
    disable_adapters,
    merge,
    merge_and_unload,
    set_active,
    trainable_report,
    unmerge,
)
from loratune.config import LoraConfig
from tiny import randomize_lora, tiny_llama

IDS = torch.tensor([[1, 5, 9, 33, 2, 17, 90, 4]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_zero_init_keeps_logits_and_only_adapter_trains():
    model = tiny_llama()
    before = logits(model)
    paths = add_adapter(model, LoraConfig(r=4, lora_alpha=8))
    assert torch.equal(logits(model), before)
    assert len(paths) == 2 * 7 and all("lm_head" not in p for p in paths)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default.lora_" in n for n in trainable)


def test_forward_equals_explicit_delta_and_scaling():
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    randomize_lora(model)
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 32)
    ad = layer.adapters["default"]
    want = x @ (layer.base_layer.weight + ad.lora_B @ ad.lora_A * 2.0).T
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)
    rs = LoraConfig(r=4, lora_alpha=8, use_rslora=True)
    assert LoraAdapter(32, 32, rs).scaling == pytest.approx(8 / math.sqrt(4))


def test_gaussian_and_kaiming_init_have_zero_B():
    for init in (True, "gaussian"):
        model = tiny_llama()
        add_adapter(model, LoraConfig(r=8, init_lora_weights=init, target_modules=["v_proj"]))
        ad = model.model.layers[1].self_attn.v_proj.adapters["default"]
        assert torch.count_nonzero(ad.lora_B) == 0 and ad.lora_A.abs().sum() > 0
    assert ad.lora_A.std().item() == pytest.approx(1 / 8, rel=0.3)


def test_target_selection_names_regex_and_nothing_matched():
    model = tiny_llama()
    paths = add_adapter(model, LoraConfig(target_modules=r".*layers\.1\.mlp\.(up|down)_proj"))
    assert paths == ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    with pytest.raises(AdapterError, match=r"matches no linear layer.*q_proj"):
        add_adapter(tiny_llama(), LoraConfig(target_modules=["qkv_proj"]))


def test_named_adapters_activate_weighted_disable_delete():
    model = tiny_llama()
    base = logits(model)
    add_adapter(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), "a")
    add_adapter(model, LoraConfig(r=4, target_modules=["v_proj", "down_proj"]), "b")
    randomize_lora(model)
    set_active(model, "a")
    out_a = logits(model)
    set_active(model, "b")
    out_b = logits(model)
    assert not torch.allclose(out_a, base) and not torch.allclose(out_a, out_b)
    set_active(model, {"a": 0.5, "b": 0.5})
    mixed = logits(model)
    layer = model.model.layers[0].self_attn.v_proj
    x = torch.randn(2, 32)
    want = (layer.base_layer(x) + 0.5 * layer.adapters["a"](x) + 0.5 * layer.adapters["b"](x))
    torch.testing.assert_close(layer(x), want)
    with disable_adapters(model):
        torch.testing.assert_close(logits(model), base)
    torch.testing.assert_close(logits(model), mixed)
    delete_adapter(model, "a")
    assert adapter_names(model) == ["b"]
    assert not isinstance(model.model.layers[0].self_attn.q_proj, AdaptedLinear)
    with pytest.raises(AdapterError, match="unknown adapter"):
        set_active(model, "a")


def test_merge_unmerge_exact_and_merge_and_unload_plain():
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=4, lora_alpha=16))
    randomize_lora(model)
    weight0 = model.model.layers[0].mlp.up_proj.base_layer.weight.clone()
    unmerged = logits(model)
    merge(model)
    torch.testing.assert_close(logits(model), unmerged, atol=1e-5, rtol=1e-5)
    unmerge(model)
    torch.testing.assert_close(model.model.layers[0].mlp.up_proj.base_layer.weight, weight0,
                               atol=1e-6, rtol=0)
    plain = merge_and_unload(model)
    assert type(plain).__name__ == "LlamaForCausalLM"
    assert not any(isinstance(m, (AdaptedLinear, SavedModule)) for m in plain.modules())
    torch.testing.assert_close(logits(plain), unmerged, atol=1e-5, rtol=1e-5)


def test_trainable_report_counts():
    model = tiny_llama()
    total0 = sum(p.numel() for p in model.parameters())
    add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"]))
    trainable, total, text = trainable_report(model)
    assert trainable == 2 * 2 * (32 + 32)
    assert total == total0 + trainable
    assert text.startswith(f"trainable params: {trainable:,} || all params: {total:,}")


def test_modules_to_save_and_bias_modes():
    model = tiny_llama(bias=True)
    add_adapter(model, LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"],
                                  bias="lora_only"))
    assert isinstance(model.lm_head, SavedModule)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "lm_head.copies.default.weight" in names
    assert "model.layers.0.self_attn.q_proj.base_layer.bias" in names
    assert "model.layers.0.self_attn.k_proj.bias" not in names
    before = logits(model)
    with torch.no_grad():
        model.lm_head.copies["default"].weight.add_(0.1)
    assert not torch.allclose(logits(model), before)
    with disable_adapters(model):
        assert model.lm_head.current() is model.lm_head.original
    model2 = tiny_llama(bias=True)
    add_adapter(model2, LoraConfig(target_modules=["q_proj"], bias="all"))
    assert model2.model.layers[0].self_attn.k_proj.bias.requires_grad


def test_bad_adapter_name_and_duplicate():
    model = tiny_llama()
    with pytest.raises(AdapterError, match="must use"):
        add_adapter(model, LoraConfig(), "../x")
    add_adapter(model, LoraConfig(target_modules=["q_proj"]), "x")
    with pytest.raises(AdapterError, match="already exists"):
        add_adapter(model, LoraConfig(target_modules=["q_proj"]), "x")


def test_training_step_moves_only_adapter():
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    base = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        out = model(input_ids=IDS, labels=IDS)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.1
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n
    assert isinstance(model.model.layers[0].self_attn.q_proj.base_layer, nn.Linear)
