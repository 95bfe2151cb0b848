"""IA³: identity at init, PEFT parity both ways, input vs output scales, merge, weights, training."""

import json

import pytest
import torch

from loratune.adapters import (add_adapter, delete_adapter, load_adapter, merge, merge_and_unload,
                               save_adapter, set_active, unmerge)
from loratune.adapters.inject import AdapterError, adapted_layers
from loratune.config import IA3Config, QuantConfig
from loratune.models.quantize import quantize_model
from loratune.train.loss import causal_lm_loss
from tiny import tiny_llama

IDS = torch.tensor([[3, 7, 11, 2, 64, 99, 5], [9, 8, 7, 6, 5, 4, 3]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def randomize_ia3(model, seed=3, name=None):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            for n, ad in layer.adapters.items():
                if name in (None, n):
                    ad.ia3_l.copy_(1 + 0.5 * torch.randn(ad.ia3_l.shape, generator=g))
    return model


def ia3_model(seed=0, **kw):
    model = tiny_llama(seed, bias=kw.pop("bias", False))
    add_adapter(model, IA3Config(**kw))
    return randomize_ia3(model)


def test_fresh_ia3_is_the_identity_and_shapes_follow_peft():
    model = tiny_llama()
    base = logits(model)
    add_adapter(model, IA3Config())
    torch.testing.assert_close(logits(model), base, atol=0, rtol=0)
    shapes = {p.rsplit(".", 1)[-1]: tuple(l.adapters["default"].ia3_l.shape)
              for p, l in adapted_layers(model)}
    assert shapes == {"k_proj": (16, 1), "v_proj": (16, 1), "down_proj": (1, 64)}


def test_scales_the_right_side_of_each_layer():
    model = tiny_llama()
    add_adapter(model, IA3Config())
    layer0 = model.model.layers[0]
    x = torch.randn(2, 5, 32)
    h = torch.randn(2, 5, 64)
    with torch.no_grad():
        layer0.self_attn.k_proj.adapters["default"].ia3_l.fill_(2.0)
        layer0.mlp.down_proj.adapters["default"].ia3_l.copy_(torch.linspace(0, 2, 64).view(1, -1))
        k_base = layer0.self_attn.k_proj.base_layer(x)
        torch.testing.assert_close(layer0.self_attn.k_proj(x), 2 * k_base)
        down = layer0.mlp.down_proj
        torch.testing.assert_close(down(h), down.base_layer(h * torch.linspace(0, 2, 64)))


@pytest.mark.parametrize("bias", [False, True])
def test_ours_loads_in_peft_and_peft_in_ours(tmp_path, bias):
    peft = pytest.importorskip("peft")
    model = ia3_model(bias=bias)
    ours = logits(model)
    save_adapter(model, tmp_path / "ad")
    raw = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert raw["peft_type"] == "IA3" and raw["feedforward_modules"] == ["down_proj"]
    theirs = peft.PeftModel.from_pretrained(tiny_llama(bias=bias), tmp_path / "ad")
    torch.testing.assert_close(logits(theirs), ours, atol=1e-5, rtol=0)

    # and back: a PEFT-made IA³ adapter in loratune
    pm = peft.get_peft_model(tiny_llama(bias=bias), peft.IA3Config(
        target_modules=["k_proj", "v_proj", "up_proj"], feedforward_modules=["up_proj"]))
    randomize_peft = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "ia3_l" in n:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=randomize_peft))
    expected = logits(pm)
    pm.save_pretrained(tmp_path / "peft")
    mine = tiny_llama(bias=bias)
    config = load_adapter(mine, tmp_path / "peft")
    assert config.method == "ia3" and config.feedforward_modules == ["up_proj"]
    torch.testing.assert_close(logits(mine), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_merge_unmerge_exact_with_bias(weight):
    model = ia3_model(bias=True)
    base_w = {p: l.base_layer.weight.clone() for p, l in adapted_layers(model)}
    set_active(model, {"default": weight})
    expected = logits(model)
    merge(model)
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=1e-5)
    unmerge(model)
    for p, l in adapted_layers(model):
        torch.testing.assert_close(l.base_layer.weight, base_w[p], atol=1e-6, rtol=1e-6)
    plain = merge_and_unload(model)
    assert not list(adapted_layers(plain))
    torch.testing.assert_close(logits(plain), expected, atol=1e-5, rtol=1e-5)


def test_weight_zero_is_the_base_and_delete_restores_it():
    model = tiny_llama()
    base = logits(model)
    add_adapter(model, IA3Config())
    randomize_ia3(model)
    set_active(model, {"default": 0.0})
    torch.testing.assert_close(logits(model), base, atol=1e-6, rtol=0)
    delete_adapter(model, "default")
    assert not list(adapted_layers(model))


def test_feedforward_must_be_a_subset_of_targets():
    with pytest.raises(AdapterError, match=r"feedforward_modules \['gate_proj'\] are not among"):
        add_adapter(tiny_llama(), IA3Config(target_modules=["k_proj"],
                                            feedforward_modules=["gate_proj"]))


def test_trains_on_a_4bit_base():
    torch.manual_seed(0)
    model = tiny_llama()
    quantize_model(model, QuantConfig(blocksize=32))
    add_adapter(model, IA3Config())
    batch = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS), "labels": IDS.clone()}
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.shape[0] == 1 or p.shape[1] == 1 for p in params)
    opt = torch.optim.AdamW(params, lr=0.05)
    first = None
    for _ in range(30):
        loss, n = causal_lm_loss(model, batch)
        (loss / n).backward()
        opt.step()
        opt.zero_grad()
        first = first if first is not None else float(loss.detach() / n)
    assert float(loss / n) < first - 0.1


def test_folder_with_another_methods_tensors_is_named(tmp_path):
    model = ia3_model()
    save_adapter(model, tmp_path / "ad")
    cfg_path = tmp_path / "ad" / "adapter_config.json"
    raw = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["k_proj"]}))
    with pytest.raises(AdapterError, match="holds IA3 tensors .*ia3_l.* says peft_type LORA"):
        load_adapter(tiny_llama(), tmp_path / "ad")
    assert raw["peft_type"] == "IA3"
