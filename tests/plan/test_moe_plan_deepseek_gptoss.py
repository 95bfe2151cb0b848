"""The planner on GPT-OSS and DeepSeek-V2/V3 (issue 30 item 3): total and active parameters,
the routers and the per-expert adapter sizes exact against tiny models built from their config
classes (shared experts, leading dense layers, grouped routing, MLA with and without a query
bottleneck; GPT-OSS's biased experts, router and attention sinks)."""

import json

import pytest
import torch

from loratune.adapters import add_adapter
from loratune.config import LoraConfig
from loratune.plan.memory import Setup, estimate
from loratune.plan.shapes import ModelShape

COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, num_experts_per_tok=2, tie_word_embeddings=False)
MLA = dict(num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
           v_head_dim=8, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=6,
           first_k_dense_replace=1, n_group=2, topk_group=1)
TINY = {
    "gpt_oss": ("gpt_oss", dict(intermediate_size=16, num_local_experts=5, head_dim=8,
                                layer_types=["sliding_attention", "full_attention",
                                             "sliding_attention"])),
    "deepseek_v2": ("deepseek_v2", dict(MLA, q_lora_rank=16, n_shared_experts=2,
                                        topk_method="group_limited_greedy")),
    "deepseek_v2_lite": ("deepseek_v2", dict(MLA, q_lora_rank=None, n_shared_experts=1)),
    "deepseek_v3": ("deepseek_v3", dict(MLA, q_lora_rank=16, n_shared_experts=1)),
}

# DeepSeek-V2-Lite's config.json (the fields the planner reads)
LITE = {"model_type": "deepseek_v2", "hidden_size": 2048, "intermediate_size": 10944,
        "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16,
        "num_key_value_heads": 16, "n_routed_experts": 64, "n_shared_experts": 2,
        "num_experts_per_tok": 6, "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "kv_lora_rank": 512, "q_lora_rank": None, "qk_rope_head_dim": 64,
        "qk_nope_head_dim": 128, "v_head_dim": 128, "vocab_size": 102400,
        "tie_word_embeddings": False}


def tiny(name):
    from transformers import AutoConfig, AutoModelForCausalLM

    kind, extra = TINY[name]
    config = AutoConfig.for_model(kind, **{**COMMON, **extra})
    torch.manual_seed(0)
    return config, AutoModelForCausalLM.from_config(config)


def routed(model):
    return [layer.mlp.experts for layer in model.model.layers if hasattr(layer.mlp, "experts")]


def routers(model):
    return [getattr(layer.mlp, "router", None) or layer.mlp.gate for layer in model.model.layers
            if hasattr(layer.mlp, "experts")]


@pytest.mark.parametrize("name", TINY)
def test_total_active_and_router_parameters_equal_the_model(name):
    """Total = every parameter; active = total less the routed experts (their matrices and
    biases) a token is not sent to; the routers' parameters; LoRA on all linear layers
    (attention, dense MLPs, shared experts) equals what add_adapter makes trainable."""
    config, model = tiny(name)
    shape = ModelShape.from_hf_config(config.to_dict(), name)
    total = sum(p.numel() for p in model.parameters())
    skipped = 0
    for experts in routed(model):
        per_expert = sum(p.numel() for p in experts.parameters()) // shape.experts
        skipped += (shape.experts - config.num_experts_per_tok) * per_expert
    assert len(routed(model)) == shape.moe_layers and skipped > 0
    assert shape.params == total
    assert shape.active_params == total - skipped
    assert shape.router_params == sum(p.numel() for r in routers(model) for p in r.parameters())
    add_adapter(model, LoraConfig(r=4, target_modules="all-linear"))
    assert shape.lora_params(4) == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["deepseek_v2", "deepseek_v3", "gpt_oss"])
def test_per_expert_adapter_parameters_equal_expert_lora(name):
    """LoRA on the routed experts: r x (in + out) per expert and projection, as add_adapter
    makes them; the planner adds them to the trainable count with Setup(experts=True)."""
    config, model = tiny(name)
    shape = ModelShape.from_hf_config(config.to_dict(), name)
    add_adapter(model, LoraConfig(r=4, target_modules=["experts"]))
    assert shape.expert_lora_params(4) == sum(p.numel() for p in model.parameters()
                                              if p.requires_grad)
    plain = estimate(shape, Setup(method="lora", rank=4, dtype="fp32"))
    both = estimate(shape, Setup(method="lora", rank=4, dtype="fp32", experts=True))
    assert both.adapter - plain.adapter == 4 * shape.expert_lora_params(4)


def test_deepseek_v2_lite_counts():
    """DeepSeek-V2-Lite's config.json: 15.7B total; 2.4B active without the embedding lookup
    (its model card: 16B total, 2.4B activated)."""
    shape = ModelShape.from_hf_config(LITE, "deepseek-v2-lite")
    assert round(shape.params / 1e9, 1) == 15.7
    assert round(shape.active_params / 1e9, 2) == 2.66  # with embeddings and lm_head
    assert 2.4e9 <= shape.active_params - 102400 * 2048 < 2.5e9


def test_plan_command_reports_moe_lines_and_adds_expert_lora(tmp_path, capsys):
    """`loratune plan` on an MoE config.json: the active count, routers and the per-expert
    LoRA line; --experts puts the experts' adapter into the adapter row."""
    import re

    from loratune.cli import main

    (tmp_path / "config.json").write_text(json.dumps(LITE))
    shape = ModelShape.from_hf_config(LITE, "lite")
    args = ["plan", "--model", str(tmp_path), "--method", "lora", "--rank", "4", "--dtype",
            "fp32", "--device", "cpu"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert f"{shape.active_params / 1e9:.2f}B active" in plain and "not included" in plain
    per_expert = 4 * ((2048 + 2 * 1408) + (1408 + 2048))
    assert f"{per_expert:,} params per expert" in plain
    assert main(args + ["--experts"]) == 0
    both = capsys.readouterr().out
    assert "(included)" in both

    def adapter_gib(text):
        return float(re.search(r"\n  (?:LoRA weights|adapter)\S*[^\n]*?([\d.]+) GiB", text)[1])
    assert adapter_gib(both) > adapter_gib(plain)
