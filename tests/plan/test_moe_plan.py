"""The planner on mixture-of-experts decoders: total and active parameters exact against tiny
models built from their config classes, and the QLoRA estimate of a Qwen3-30B-A3B shape."""

import pytest
import torch

from loratune.adapters import add_adapter
from loratune.config import LoraConfig
from loratune.plan.memory import Setup, estimate
from loratune.plan.shapes import QWEN3_30B_A3B, ModelShape

COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, num_experts_per_tok=2, tie_word_embeddings=False)
TINY = {"qwen3_moe": dict(moe_intermediate_size=16, num_experts=6, head_dim=8),
        "mixtral": dict(intermediate_size=24, num_local_experts=5),
        "olmoe": dict(intermediate_size=16, num_experts=4)}


def tiny(name):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(name, **COMMON, **TINY[name])
    torch.manual_seed(0)
    return config, AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("name", TINY)
def test_total_and_active_parameters_equal_the_model(name):
    """Total = every parameter; active = total less the routed experts a token skips
    ((experts - k) of each layer's, counted from the model's own fused tensors)."""
    config, model = tiny(name)
    shape = ModelShape.from_hf_config(config.to_dict(), name)
    total = sum(p.numel() for p in model.parameters())
    skipped = 0
    for layer in model.model.layers:
        experts = layer.mlp.experts
        per_expert = (experts.gate_up_proj.numel() + experts.down_proj.numel()) \
            // experts.num_experts
        skipped += (experts.num_experts - config.num_experts_per_tok) * per_expert
    assert shape.params == total
    assert shape.active_params == total - skipped
    add_adapter(model, LoraConfig(r=4, target_modules="all-linear"))
    assert shape.lora_params(4) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_qwen3_30b_a3b_counts_and_qlora_estimate():
    """30.5B total, 3.3B active (Qwen's model card); QLoRA r=16, bf16, batch 1 x 2048, with
    checkpointing: the routed experts in NF4 bring the weights to ~16 GiB."""
    shape = ModelShape.from_hf_config(QWEN3_30B_A3B, "qwen3-30b-a3b")
    assert round(shape.params / 1e9, 1) == 30.5
    assert 3.3e9 <= shape.active_params < 3.4e9  # 3.35B with embeddings and lm_head
    b = estimate(shape, Setup(method="qlora", rank=16, seq=2048, dtype="bf16"))
    assert 15 * 2**30 < b.weights + b.quant_stats < 17 * 2**30
    assert b.total < 20 * 2**30


def test_moe_families_the_planner_does_not_count_are_refused_by_name():
    with pytest.raises(ValueError, match="model_type 'qwen2_moe' is not one of them"):
        ModelShape.from_hf_config({"model_type": "qwen2_moe", "hidden_size": 8}, "q2")


def saved_values(layer, rotary, hidden: int, tokens: int) -> float:
    """fp32 values one decoder layer's forward keeps for backward: every tensor storage the
    autograd graph saves, parameters left out, the layer's input in."""
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    x = torch.randn(1, tokens, hidden, requires_grad=True)
    pos = torch.arange(tokens)[None]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, position_embeddings=rotary(x, pos), attention_mask=None, position_ids=pos)
    return sum(saved.values()) / 4


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_moe_layer_activations_match_what_autograd_saves(name):
    """The planner's per-token activations of an MoE decoder layer (LoRA on attention and on
    the routed experts, our grouped-experts forward) against what autograd keeps: the slope
    between two token counts, so per-layer constants (B's grouped copies) drop out."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from loratune.plan.memory import layer_activations

    fields = dict(COMMON, num_hidden_layers=1, hidden_size=64,
                  **{"qwen3_moe": dict(moe_intermediate_size=32, num_experts=8, head_dim=16),
                     "mixtral": dict(intermediate_size=32, num_local_experts=8)}[name])
    config = AutoConfig.for_model(name, **fields)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    add_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                       "experts"]))
    model.train()
    layer, rotary = model.model.layers[0], model.model.rotary_emb
    slope = (saved_values(layer, rotary, 64, 384) - saved_values(layer, rotary, 64, 128)) / 256
    planned = layer_activations(ModelShape.from_hf_config(config.to_dict(), name),
                                Setup(method="lora", rank=4, dtype="fp32", experts=True))
    assert 0.9 < planned / slope < 1.1, (planned, slope)
