"""LoRA on routed experts held as fused 3-D parameters (adapters/expert_lora.py), with PEFT's
`target_parameters` (ParamWrapper) as the oracle both ways."""

import warnings

import pytest
import torch
from transformers import (MixtralConfig, MixtralForCausalLM, OlmoeConfig, OlmoeForCausalLM,
                          Qwen3MoeConfig, Qwen3MoeForCausalLM)

from loratune.adapters import add_adapter, load_adapter, save_adapter
from loratune.adapters.expert_lora import ExpertHost
from loratune.adapters.inject import merge_and_unload, trainable_parameters
from loratune.adapters.registry import AdapterError
from loratune.config import IA3Config, LoHaConfig, LoraConfig

_SHAPE = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=64)


def tiny_moe(family: str, seed: int = 0):
    torch.manual_seed(seed)
    if family == "qwen3_moe":
        cfg = Qwen3MoeConfig(**_SHAPE, head_dim=8, intermediate_size=32, moe_intermediate_size=8,
                             num_experts=4, num_experts_per_tok=2, norm_topk_prob=True)
        model = Qwen3MoeForCausalLM(cfg)
    elif family == "mixtral":
        cfg = MixtralConfig(**_SHAPE, head_dim=8, intermediate_size=8, num_local_experts=4,
                            num_experts_per_tok=2)
        model = MixtralForCausalLM(cfg)
    else:
        cfg = OlmoeConfig(**_SHAPE, intermediate_size=8, num_experts=4, num_experts_per_tok=2)
        model = OlmoeForCausalLM(cfg)
    with torch.no_grad():  # random routers: every expert gets some tokens
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") or "experts." in name:
                p.normal_(0, 0.5)
    return model.eval()


def randomize(model, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in trainable_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits.float()


def test_all_linear_on_moe_says_experts_are_left_out():
    model = tiny_moe("qwen3_moe")
    with pytest.warns(UserWarning, match=r"2 routed-expert modules .*'experts'") as seen:
        add_adapter(model, LoraConfig(r=2, target_modules="all-linear"))
    assert len([w for w in seen if "routed-expert" in str(w.message)]) == 1
    assert not any(isinstance(m, ExpertHost) for m in model.modules())


def test_experts_named_get_per_expert_adapters_router_frozen():
    model = tiny_moe("qwen3_moe")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        targets = add_adapter(model, LoraConfig(r=2, target_modules=["q_proj", "experts"]))
    assert targets[-2:] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    ad = model.model.layers[0].mlp.experts.adapters["default"]
    assert ad.gate_up_proj_A.shape == (4 * 2, 16) and ad.gate_up_proj_B.shape == (16, 2 * 4)
    assert ad.down_proj_A.shape == (4 * 2, 8) and ad.down_proj_B.shape == (16, 2 * 4)
    trainable = {n for n, _ in trainable_parameters(model)}
    assert not any(".gate." in n or n.endswith("gate.weight") for n in trainable)


def test_router_that_is_no_linear_is_refused_naming_modules_to_save():
    with pytest.raises(AdapterError, match=r"router model.layers.0.mlp.gate is a .*"
                                           r"modules_to_save: \['gate'\]"):
        add_adapter(tiny_moe("mixtral"), LoraConfig(r=2, target_modules=["router"]))


def test_expert_update_is_routed_rows_times_a_b_and_merge_folds_it():
    """The adapter's logits equal the base's with W_e + s·B_e·A_e written into the fused
    tensors by hand (the per-expert formula, independent of the host's loop)."""
    model = tiny_moe("qwen3_moe")
    add_adapter(model, LoraConfig(r=2, lora_alpha=4, target_modules=["experts"]))
    randomize(model)
    adapted = logits(model)
    reference = tiny_moe("qwen3_moe")
    with torch.no_grad():
        for i, layer in enumerate(reference.model.layers):
            ad = model.model.layers[i].mlp.experts.adapters["default"]
            for pname in ("gate_up_proj", "down_proj"):
                a = getattr(ad, pname + "_A").view(4, 2, -1)
                b = getattr(ad, pname + "_B").view(-1, 2, 4)
                for e in range(4):
                    getattr(layer.mlp.experts, pname)[e] += 2.0 * b[:, :, e] @ a[e]
    assert (adapted - logits(tiny_moe("qwen3_moe"))).abs().max() > 1e-3
    torch.testing.assert_close(adapted, logits(reference), atol=1e-5, rtol=0)
    merged = merge_and_unload(model)
    assert type(merged.model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"
    torch.testing.assert_close(logits(merged), adapted, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "olmoe"])
def test_peft_loads_our_folder_with_equal_logits(family, tmp_path):
    from peft import PeftModel

    model = tiny_moe(family)
    add_adapter(model, LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj", "experts"]))
    randomize(model)
    save_adapter(model, tmp_path / "a")
    peft_model = PeftModel.from_pretrained(tiny_moe(family), tmp_path / "a").eval()
    torch.testing.assert_close(logits(peft_model), logits(model), atol=1e-5, rtol=0)


def peft_made(model, folder, r: int = 2):
    """PEFT's own adapter on `model` (v_proj and the fused experts' target_parameters), its
    factors random, saved to `folder`; returns the PEFT model."""
    from peft import LoraConfig as PeftLora, get_peft_model

    peft_model = get_peft_model(model, PeftLora(
        r=r, lora_alpha=4, target_modules=["v_proj"], target_parameters=[
            "experts.gate_up_proj", "experts.down_proj"]))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    peft_model.save_pretrained(folder)
    return peft_model


def test_we_load_peft_folder_with_equal_logits(tmp_path):
    peft_model = peft_made(tiny_moe("qwen3_moe"), tmp_path / "p")
    model = tiny_moe("qwen3_moe")
    load_adapter(model, tmp_path / "p")
    assert isinstance(model.model.layers[1].mlp.experts, ExpertHost)
    torch.testing.assert_close(logits(model), logits(peft_model.eval()), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_a_few_steps_train_experts_save_reload_and_merge(family, tmp_path):
    model = tiny_moe(family).train()
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["experts"]))
    experts = model.model.layers[0].mlp.experts
    before = {k: t.detach().clone() for k, t in experts.adapters["default"].file_tensors().items()}
    fused_before = experts.base_layer.gate_up_proj.detach().clone()
    opt = torch.optim.AdamW([p for _, p in trainable_parameters(model)], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    after = experts.adapters["default"].file_tensors()
    assert all((after[k] - before[k]).abs().max() > 1e-4 for k in before)
    model.eval()
    save_adapter(model, tmp_path / "a")
    fresh = tiny_moe(family)
    load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(logits(fresh), logits(model), atol=1e-5, rtol=0)
    merged = merge_and_unload(model)
    assert (merged.model.layers[0].mlp.experts.gate_up_proj - fused_before).abs().max() > 1e-4
    torch.testing.assert_close(logits(merged), logits(fresh), atol=1e-5, rtol=0)


@pytest.mark.parametrize("config", [LoraConfig(method="dora", r=2, target_modules=["experts"]),
                                    LoHaConfig(r=2, target_modules=["experts"]),
                                    IA3Config(target_modules=["experts"])],
                         ids=["dora", "loha", "ia3"])
def test_methods_without_a_fused_experts_form_are_refused_by_name(config):
    from tests.models.test_moe_families import build_moe

    model, _ = build_moe("qwen3_moe")
    with pytest.raises(AdapterError, match=rf"model.layers.0.mlp.experts\), held as fused 3-D "
                                           rf"parameters; {config.method} cannot adapt them"):
        add_adapter(model, config)
