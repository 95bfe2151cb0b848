"""DoRA: zero-init identity, PEFT parity both ways, merge/unmerge, 4-bit base, training."""

import json

import pytest
import torch

from loratune.adapters import add_adapter, load_adapter, merge, save_adapter, unmerge
from loratune.adapters.inject import adapted_layers, set_active
from loratune.config import LoraConfig, QuantConfig
from loratune.models.quantize import quantize_model
from loratune.quant.linear4bit import Linear4bit
from tiny import randomize_lora, tiny_llama

IDS = torch.tensor([[3, 7, 11, 2, 64, 99, 5]])
DORA = LoraConfig(method="dora", r=4, lora_alpha=8)


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def randomize_magnitude(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            for ad in layer.adapters.values():
                if not hasattr(ad, "lora_magnitude_vector"):
                    continue
                ad.lora_magnitude_vector.mul_(1 + 0.3 * torch.randn(ad.lora_magnitude_vector.shape,
                                                                    generator=g))


def dora_model(seed=0):
    model = tiny_llama(seed)
    add_adapter(model, DORA)
    randomize_lora(model)
    randomize_magnitude(model)
    return model


def test_method_and_use_dora_are_one_setting():
    assert LoraConfig(method="dora").use_dora and LoraConfig(use_dora=True).method == "dora"


def test_fresh_dora_is_the_identity():
    base = logits(tiny_llama())
    model = tiny_llama()
    add_adapter(model, DORA)
    torch.testing.assert_close(logits(model), base, atol=1e-5, rtol=1e-5)


def test_ours_loads_in_peft_and_peft_in_ours(tmp_path):
    peft = pytest.importorskip("peft")
    model = dora_model()
    ours = logits(model)
    save_adapter(model, tmp_path / "ad")
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["use_dora"]
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ad")
    assert (logits(theirs) - ours).abs().max().item() < 1e-4
    # and the other way: PEFT trains/saves its own DoRA, we load it
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(
        r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "down_proj"],
        task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            if "lora_magnitude_vector" in n:
                p.mul_(1.2)
    pm.save_pretrained(tmp_path / "peft_ad")
    mine = tiny_llama()
    load_adapter(mine, tmp_path / "peft_ad")
    assert (logits(mine) - logits(pm)).abs().max().item() < 1e-4


def test_merge_and_unmerge_exact():
    model = dora_model()
    before = logits(model)
    weights = {n: l.base_layer.weight.clone() for n, l in adapted_layers(model)}
    merge(model)
    assert (logits(model) - before).abs().max().item() < 1e-4
    unmerge(model)
    for n, l in adapted_layers(model):
        torch.testing.assert_close(l.base_layer.weight, weights[n], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=1e-5)


def test_weighted_merge_equals_weighted_forward():
    model = dora_model()
    set_active(model, {"default": 0.5})
    before = logits(model)
    merge(model)
    assert (logits(model) - before).abs().max().item() < 1e-4
    unmerge(model)
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=1e-5)


def test_dora_on_a_4bit_base_matches_dora_on_its_dequantized_weights():
    q = tiny_llama()
    quantize_model(q, QuantConfig())
    plain = tiny_llama()
    with torch.no_grad():  # the same base numbers, in fp32 Linear layers
        for (name, m) in q.named_modules():
            if isinstance(m, Linear4bit):
                plain.get_submodule(name).weight.copy_(m.dequantize())
    for model in (q, plain):
        torch.manual_seed(7)  # the same A for both
        add_adapter(model, DORA)
        randomize_lora(model)
        randomize_magnitude(model)
    torch.testing.assert_close(logits(q), logits(plain), atol=1e-4, rtol=1e-4)


def test_training_lowers_loss_and_trains_the_magnitude():
    model = tiny_llama()
    add_adapter(model, DORA)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert any(p.dim() == 1 for p in params)  # the magnitude vectors
    opt = torch.optim.AdamW(params, lr=3e-2)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(60):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    mag = next(l for _, l in adapted_layers(model)).adapters["default"].lora_magnitude_vector
    assert mag.grad is not None and mag.grad.abs().sum() > 0


def test_dora_beside_another_active_adapter_adds_its_own_update():
    model = tiny_llama()
    add_adapter(model, DORA, "d")
    add_adapter(model, LoraConfig(r=4, lora_alpha=8), "l")
    randomize_lora(model)
    randomize_magnitude(model)
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, 32)
    outs = {}
    with torch.no_grad():
        for key, active in (("both", ["l", "d"]), ("d", ["d"]), ("l", ["l"])):
            set_active(model, active)
            outs[key] = layer(x)
        base = layer.base_layer(x)
    torch.testing.assert_close(outs["both"], outs["d"] + outs["l"] - base, atol=1e-5, rtol=1e-5)
