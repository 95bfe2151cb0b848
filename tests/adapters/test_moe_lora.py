"""MoE-LoRA: identity at init, routing math, top-k, load balancing, save/load, no merge, training."""

import json

import pytest
import torch

from loratune.adapters import add_adapter, load_adapter, merge, save_adapter
from loratune.adapters.inject import AdapterError, adapted_layers
from loratune.adapters.moe_lora import take_aux_loss
from loratune.config import MoeLoraConfig, build_config
from loratune.train.loss import causal_lm_loss
from tiny import tiny_llama

IDS = torch.tensor([[3, 7, 11, 2, 64, 99, 5], [9, 8, 7, 6, 5, 4, 3]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def randomize(model, seed=4):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            for ad in layer.adapters.values():
                ad.lora_B.copy_(0.2 * torch.randn(ad.lora_B.shape, generator=g))
                ad.router.copy_(torch.randn(ad.router.shape, generator=g))
    return model


def test_fresh_is_identity_and_config_checks_k():
    model = tiny_llama()
    base = logits(model)
    add_adapter(model, MoeLoraConfig(r=4, num_experts=3, target_modules=["q_proj", "v_proj"]))
    torch.testing.assert_close(logits(model), base, atol=0, rtol=0)
    with pytest.raises(Exception, match="top_k=5 exceeds num_experts=4"):
        build_config({"adapter": {"method": "moe_lora", "top_k": 5}})


@pytest.mark.parametrize("top_k", [None, 1, 2])
def test_update_equals_the_gated_sum_of_expert_loras(top_k):
    model = tiny_llama()
    add_adapter(model, MoeLoraConfig(r=2, lora_alpha=4, num_experts=3, top_k=top_k,
                                     target_modules=["q_proj"]))
    randomize(model)
    layer = model.model.layers[0].self_attn.q_proj
    ad = layer.adapters["default"]
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        probs = torch.softmax(x @ ad.router.t(), -1)
        if top_k is not None:
            keep = probs >= probs.topk(top_k, -1).values[..., -1:]
            probs = probs * keep / (probs * keep).sum(-1, keepdim=True)
        expected = layer.base_layer(x)
        for e in range(3):
            expected = expected + probs[..., e:e + 1] * (x @ ad.lora_A[e].t() @ ad.lora_B[e].t()) * 2
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
        if top_k == 1:  # every token uses exactly one expert
            assert ((ad.gates(x) > 0).sum(-1) == 1).all()


def test_balance_loss_is_lowest_for_an_even_router():
    model = tiny_llama()
    add_adapter(model, MoeLoraConfig(r=2, num_experts=4, top_k=1, router_aux_loss_coef=1.0,
                                     target_modules=["q_proj"]))
    ad = model.model.layers[0].self_attn.q_proj.adapters["default"]
    ad.train()
    x = torch.randn(64, 32) + 1
    with torch.no_grad():
        ad.router.zero_()
        ad.router[0] = 1.0  # every token (all features near 1) goes to expert 0
        ad.gates(x)
        skewed = float(ad.aux_loss)
        ad.router.copy_(torch.randn(4, 32) * 1e-3)
        ad.gates(x)
        even = float(ad.aux_loss)
    assert skewed > 3.5 and even < 1.5  # E·Σ f·P is 1 when perfectly even, up to E when collapsed


def test_save_load_round_trip_and_merge_refused(tmp_path):
    model = tiny_llama()
    add_adapter(model, MoeLoraConfig(r=4, num_experts=3, top_k=2))
    randomize(model)
    expected = logits(model)
    save_adapter(model, tmp_path / "ad")
    raw = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert raw["peft_type"] == "LORATUNE_MOE_LORA" and raw["num_experts"] == 3
    fresh = tiny_llama()
    config = load_adapter(fresh, tmp_path / "ad")
    assert config.top_k == 2
    torch.testing.assert_close(logits(fresh), expected, atol=1e-6, rtol=0)
    with pytest.raises(AdapterError, match="routing, so no single weight"):
        merge(fresh)


def test_training_lowers_loss_and_collects_the_balance_loss():
    torch.manual_seed(0)
    model = tiny_llama()
    add_adapter(model, MoeLoraConfig(r=4, num_experts=4, top_k=2, lora_alpha=8))
    model.train()
    batch = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS), "labels": IDS.clone()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.02)
    losses = []
    for _ in range(25):
        loss, n = causal_lm_loss(model, batch)
        aux = take_aux_loss(model)
        assert aux is not None and aux.requires_grad
        (loss / n + aux).backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()) / n)
    assert take_aux_loss(model) is None  # taken once, then cleared
    assert losses[-1] < losses[0] - 0.5
    routers = [l.adapters["default"].router for _, l in adapted_layers(model)]
    assert all(float(r.abs().max()) > 0.03 for r in routers)  # the router learned too
