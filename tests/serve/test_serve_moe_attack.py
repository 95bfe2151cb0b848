"""Hostile requests and adapter files against the MoE serving of issue 30 (DeepSeek-V2/V3's MLA
attention, GPT-OSS): each case once failed deep in torch or gave a misleading answer; each
now ends the request alone with an error that names the file and what was expected, and the
engine keeps serving the other rows exactly."""

import json

import pytest
import torch
from safetensors.torch import save_file

from loratune.adapters import AdapterError, add_adapter
from loratune.config import PrefixConfig
from loratune.serve.engine import Engine
from loratune.serve.pool import AdapterPool
from loratune.serve.types import GenerationRequest, SamplingParams
from tests.models.test_moe_families import build_moe


def prefix_file(folder, tokens=3, layers=2, kv_heads=4, head_dim=8):
    """A prefix-tuning folder as PEFT writes it (PREFIX_TUNING, prompt_embeddings [n,
    layers * 2 * kv_heads * head_dim]) whose fields match the tiny DeepSeek's config."""
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": tokens,
        "token_dim": kv_heads * head_dim, "num_attention_heads": kv_heads, "num_layers": layers,
        "prefix_projection": False, "inference_mode": True}))
    table = torch.randn(tokens, layers * 2 * kv_heads * head_dim, generator=torch.Generator()
                        .manual_seed(0))
    save_file({"prompt_embeddings": table}, folder / "adapter_model.safetensors")


@pytest.mark.parametrize("family", ["deepseek_v3", "deepseek_v2"])
@pytest.mark.parametrize("kv_cache", ["slots", "dynamic"])
def test_prefix_tuning_on_an_mla_base_is_refused_naming_the_file(family, kv_cache, tmp_path):
    """MLA caches one latent per token ([n, 1, t, kv_lora_rank]) and the rotary key, not
    per-head keys and values: a prefix (per-head K/V) cannot join that cache. The request
    fails with the folder's adapter_config.json and the reason, not a size mismatch from
    inside the forward ('The expanded size of the tensor (16) must match ... [4, 3, 8]'),
    and a base request after it is served."""
    model, tok = build_moe(family)
    prefix_file(tmp_path / "pre")
    engine = Engine(model, tok, AdapterPool(tmp_path, max_adapters=1), base_name="b",
                    kv_cache=kv_cache)
    engine.eos = set()
    bad = engine.submit(GenerationRequest([3, 4, 5], {"pre": 1.0}, SamplingParams(max_tokens=3)))
    ok = engine.submit(GenerationRequest([3, 4, 5], {}, SamplingParams(max_tokens=3)))
    while engine.running or engine.queue:
        engine.step()
    failed, served = bad.result(), ok.result()
    assert failed.finish_reason == "error"
    assert str(tmp_path / "pre" / "adapter_config.json") in failed.error, failed.error
    assert "kv_lora_rank" in failed.error and "size" not in failed.error, failed.error
    assert served.finish_reason == "length" and len(served.token_ids) == 3


def test_prefix_tuning_on_an_mla_base_is_refused_when_added():
    """Training it would fail the same way in the first forward: add_adapter says why."""
    model, _ = build_moe("deepseek_v3")
    with pytest.raises(AdapterError, match="kv_lora_rank=16"):
        add_adapter(model, PrefixConfig(num_virtual_tokens=3), "pre")


def expert_adapter(folder, family="deepseek_v3", r=4):
    """An experts-only LoRA file (PEFT's target_parameters layout) saved from the tiny model."""
    from loratune.adapters import save_adapter
    from loratune.config import LoraConfig

    model, _ = build_moe(family)
    add_adapter(model, LoraConfig(r=r, lora_alpha=8, target_modules=["experts"]), "ex")
    save_adapter(model, folder, "ex")


@pytest.mark.parametrize("wrong_r", [1, 2, 8])
def test_expert_adapter_whose_config_r_is_not_its_tensors_rank_says_so(wrong_r, tmp_path):
    """A[E·r, in] of the fused experts cannot tell E from r; with `r` edited in the config the
    file was read as 16/r experts and refused as 'another base model?' alone. The model's E
    gives the rank the tensors would have: the error names adapter_config.json, its r, and
    both causes (a wrong r, or another base's expert count)."""
    from loratune.serve.pool import BadAdapter, read_lora

    expert_adapter(tmp_path / "ex")
    config = tmp_path / "ex" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "r": wrong_r}))
    model, _ = build_moe("deepseek_v3")
    with pytest.raises(BadAdapter) as err:
        read_lora("ex", tmp_path / "ex", model)
    message = str(err.value)
    assert str(config) in message and f"r is {wrong_r}" in message, message
    assert "r should be 4 (this model's 4 experts × rank 4)" in message, message


@pytest.mark.parametrize("family,leaf", [("deepseek_v3", "gate"), ("gpt_oss", "router"),
                                         ("qwen3_moe", "gate")])
def test_lora_on_a_router_held_as_a_bare_weight_is_refused_by_kind(family, leaf, tmp_path):
    """A PEFT file with LoRA on the MoE router (transformers 4 made it an nn.Linear; 5 holds
    a bare weight in a TopKRouter): refused naming the file, the router's class and that it
    is no linear layer, not as 'needs A (4, None) and B (None, 4)'."""
    from loratune.serve.pool import BadAdapter, read_lora

    folder = tmp_path / "g"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
        "target_modules": [leaf]}))
    key = f"base_model.model.model.layers.1.mlp.{leaf}"
    save_file({f"{key}.lora_A.weight": torch.randn(4, 32),
               f"{key}.lora_B.weight": torch.randn(4, 4)}, folder / "adapter_model.safetensors")
    model, _ = build_moe(family)
    with pytest.raises(BadAdapter) as err:
        read_lora("g", folder, model)
    message = str(err.value)
    router = type(model.get_submodule(f"model.layers.1.mlp.{leaf}")).__name__
    assert str(folder / "adapter_model.safetensors") in message and router in message, message
    assert "not a linear layer" in message and "None" not in message, message
