"""Adapters on a vision-language model's parts (issue 29 item 3): the `language`, `vision` and
`projector` shortcuts of adapter.target_modules / modules_to_save, every linear-layer method on
the vision side, and QLoRA with the language model in 4 bits (item 1)."""

import dataclasses

import pytest
import torch
from test_vision import _colour_task
from vision_models import tiny_qwen2_5_vl

from loratune.adapters import add_adapter, load_adapter, merge_and_unload, save_adapter
from loratune.adapters.registry import AdapterError, method_names, method_record
from loratune.adapters.vlm_targets import model_parts
from loratune.config import QuantConfig
from loratune.config.methods import LoraConfig, adapter_options
from loratune.models.vision import FAMILIES, load_vision_model, vision_logits
from loratune.models.vlm_quant import dequantize_linears, quantize_language_model
from loratune.quant.linear4bit import Linear4bit
from loratune.recipes.vision import encode_records, setup_adapter, train_vision

QWEN = FAMILIES["qwen2_5_vl"]
LINEAR_METHODS = [m for m in method_names() if method_record(m).layer_level]


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    return tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen2_5_vl"))


@pytest.fixture(scope="module")
def colours(qwen_folder, tmp_path_factory):
    _, tok, images = load_vision_model(qwen_folder)
    path, records = _colour_task(tmp_path_factory.mktemp("colours"))
    return encode_records(records, path, tok, images, QWEN)


def _linears(model, prefix):
    return sorted(n for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and n.startswith(prefix + "."))


def test_shortcuts_are_the_module_tree(qwen_folder):
    model, _, _ = load_vision_model(qwen_folder)
    assert model_parts(model) == {"language": "model.language_model", "vision": "model.visual",
                                  "projector": "model.visual.merger"}
    blocks, lm = _linears(model, "model.visual.blocks"), _linears(model, "model.language_model")
    vision = add_adapter(model, LoraConfig(target_modules="vision"), "v")
    assert sorted(vision) == blocks
    assert len(vision) == 2 * 5  # 2 blocks x qkv proj gate up down; the merger left out
    projector = add_adapter(model, LoraConfig(target_modules=["projector"]), "p")
    assert sorted(projector) == ["model.visual.merger.mlp.0", "model.visual.merger.mlp.2"]
    language = add_adapter(model, LoraConfig(target_modules="language"), "l")
    assert sorted(language) == lm and len(language) == 14
    mixed = add_adapter(model, LoraConfig(target_modules=["vision", "q_proj"]), "m")
    assert sorted(mixed) == sorted(vision + [t for t in language if t.endswith(".q_proj")])


def test_shortcut_the_model_lacks_is_refused(qwen_folder, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    text = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(AdapterError, match="target_modules names 'vision'.*not a vision"):
        add_adapter(text, LoraConfig(target_modules=["vision"]))
    monkeypatch.setitem(FAMILIES, "qwen2_5_vl", dataclasses.replace(QWEN, projector=""))
    model, _, _ = load_vision_model(qwen_folder)
    with pytest.raises(AdapterError, match="modules_to_save names 'projector'.*language, vision"):
        add_adapter(model, LoraConfig(target_modules="vision", modules_to_save=["projector"]))


def test_lora_on_vision_trains_only_the_vision_side_and_peft_loads_it(qwen_folder, colours,
                                                                      tmp_path):
    from peft import PeftModel

    model, _, _ = load_vision_model(qwen_folder)
    blocks = _linears(model, "model.visual.blocks")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    add_adapter(model, LoraConfig(target_modules="vision", modules_to_save=["projector"],
                                  r=8, lora_alpha=16))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("model.visual.") for n in trainable)
    losses = train_vision(model, colours, steps=16, lr=2e-2, batch=4)
    assert losses[-1] < 0.8 * losses[0], losses
    changed = {n for n, p in model.named_parameters()
               if n in before and not torch.equal(p, before[n])}
    assert not changed  # the frozen base, language model included, is untouched
    with torch.no_grad():
        trained = [vision_logits(model, ex) for ex in colours]
    save_adapter(model, tmp_path / "adapter")

    hf, _, _ = load_vision_model(qwen_folder)
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    # PEFT adapts the vision tower's layers only (the file's target_modules say which: leaf
    # names like gate_proj would take the language model's too, and proj the patch Conv3d)
    adapted = {n.removeprefix("base_model.model.").removesuffix(".lora_A")
               for n, _ in peft_model.named_modules() if n.endswith(".lora_A")}
    assert adapted == set(blocks)
    with torch.no_grad():
        for ex, want in zip(colours, trained):
            got = vision_logits(peft_model.base_model.model, ex)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def _options(method):
    extra = {"adalora": {"total_step": 4}, "oft": {"oft_block_size": 8},
             "vera": {"r": 4}}.get(method, {})
    return adapter_options()[method](method=method, target_modules="vision", **extra)


@pytest.mark.parametrize("method", LINEAR_METHODS)
def test_every_linear_method_trains_on_the_vision_side(method, qwen_folder, colours, tmp_path):
    model, _, _ = load_vision_model(qwen_folder)
    blocks = _linears(model, "model.visual.blocks")
    with torch.no_grad():
        base = vision_logits(model, colours[0])
    assert sorted(add_adapter(model, _options(method))) == blocks
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("model.visual.blocks.") for n in trainable)
    train_vision(model, colours, steps=3, lr=1e-2, batch=2)
    with torch.no_grad():
        trained = vision_logits(model, colours[0])
    assert (trained - base).abs().max() > 1e-4  # the vision side's update reaches the logits
    save_adapter(model, tmp_path / "adapter")
    fresh, _, _ = load_vision_model(qwen_folder)
    load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(vision_logits(fresh, colours[0]), trained, rtol=0, atol=1e-5)


def _qlora_model(folder, cfg):
    model, _, _ = load_vision_model(folder)
    return model, quantize_language_model(model, cfg)


def test_qlora_language_model_in_4_bits_vision_in_compute_dtype(qwen_folder, colours, tmp_path):
    cfg = QuantConfig(compute_dtype="float32")
    model, quantized = _qlora_model(qwen_folder, cfg)
    assert sorted(quantized) == _linears(load_vision_model(qwen_folder)[0], QWEN.language)
    four_bit = {n for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert four_bit == set(quantized) and len(four_bit) == 14
    vision = [m for n, m in model.named_modules()
              if n.startswith(QWEN.vision + ".") and isinstance(m, torch.nn.Linear)]
    assert len(vision) == 12 and all(m.weight.dtype == torch.float32 for m in vision)
    setup_adapter(model, LoraConfig(target_modules="language", r=8, lora_alpha=16))
    losses = train_vision(model, colours, steps=24, lr=2e-2, batch=4)
    assert losses[-1] < 0.5 * losses[0], losses
    with torch.no_grad():
        trained = [vision_logits(model, ex) for ex in colours]
    save_adapter(model, tmp_path / "adapter")

    fresh, _ = _qlora_model(qwen_folder, cfg)
    load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        for ex, want in zip(colours, trained):  # the same 4-bit codes: equal to fp32 rounding
            torch.testing.assert_close(vision_logits(fresh, ex), want, rtol=0, atol=1e-5)
        merged = merge_and_unload(dequantize_linears(fresh))
        assert not any(isinstance(m, Linear4bit) for m in merged.modules())
        for ex, want in zip(colours, trained):  # merged into the dequantized NF4 weights
            torch.testing.assert_close(vision_logits(merged, ex), want, rtol=1e-4, atol=1e-4)
