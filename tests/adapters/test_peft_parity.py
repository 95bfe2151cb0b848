"""PEFT is the oracle: our adapter files load in PEFT, PEFT's load in loratune, same logits."""

import json

import pytest
import torch

from loratune.adapters import AdapterError, add_adapter, load_adapter, save_adapter
from loratune.config import LoraConfig
from tiny import randomize_lora, tiny_llama

peft = pytest.importorskip("peft")
IDS = torch.tensor([[3, 7, 11, 2, 64, 99, 5]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("cfg", [
    LoraConfig(r=4, lora_alpha=8),
    LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj"]),
    LoraConfig(r=2, lora_alpha=4, target_modules=r".*\.mlp\.(gate|down)_proj",
               modules_to_save=["lm_head"]),
])
def test_ours_loads_in_peft(tmp_path, cfg):
    model = tiny_llama()
    add_adapter(model, cfg)
    randomize_lora(model)
    if cfg.modules_to_save:
        with torch.no_grad():
            model.lm_head.copies["default"].weight.mul_(1.5)
    ours = logits(model)
    save_adapter(model, tmp_path / "ad", base_model="tiny")
    saved = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == cfg.r
    theirs_model = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ad")
    theirs = logits(theirs_model)
    assert (ours - theirs).abs().max().item() < 1e-4


def test_peft_saved_loads_in_ours(tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["k_proj", "up_proj", "o_proj"],
                          rank_pattern={"up_proj": 2}, alpha_pattern={"o_proj": 3},
                          task_type="CAUSAL_LM")
    pm = peft.get_peft_model(tiny_llama(), cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    theirs = logits(pm)
    pm.save_pretrained(tmp_path / "peft_ad")
    model = tiny_llama()
    load_adapter(model, tmp_path / "peft_ad")
    assert model.model.layers[0].mlp.up_proj.adapters["default"].r == 2
    assert (logits(model) - theirs).abs().max().item() < 1e-4
    # our re-save keeps the patterns and PEFT reads it back to the same logits
    save_adapter(model, tmp_path / "again")
    again = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "again")
    assert (logits(again) - theirs).abs().max().item() < 1e-4


def test_shape_mismatch_names_tensor(tmp_path):
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=4, target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "ad")
    other = tiny_llama()
    other_cfg = other.config
    other_cfg.hidden_size = 48
    from transformers import LlamaForCausalLM

    bigger = LlamaForCausalLM(other_cfg)
    with pytest.raises(AdapterError, match=r"q_proj\.lora_A\.weight has shape \(4, 32\)"):
        load_adapter(bigger, tmp_path / "ad")
    assert not any("adapters" in n for n, _ in bigger.named_parameters())


def test_pickle_refused_and_wrong_type(tmp_path):
    folder = tmp_path / "ad"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (folder / "adapter_model.bin").write_bytes(b"not really")
    with pytest.raises(AdapterError, match="pickle files are refused"):
        load_adapter(tiny_llama(), folder)
    # a PEFT method loratune does not implement (VeRA, LoHa, LoKr and OFT are ours now)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "FOURIERFT"}))
    with pytest.raises(AdapterError, match="peft_type is 'FOURIERFT'; loratune reads LORA, IA3"):
        load_adapter(tiny_llama(), folder)


def test_save_is_atomic_and_refuses_overwrite(tmp_path):
    model = tiny_llama()
    add_adapter(model, LoraConfig(target_modules=["q_proj"]))
    out = save_adapter(model, tmp_path / "ad")
    with pytest.raises(FileExistsError):
        save_adapter(model, out)
    save_adapter(model, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]


@pytest.mark.slow
def test_real_model_round_trip_both_ways(tmp_path):
    """On SmolLM2-135M itself: ours -> PEFT and PEFT -> ours, logits within 1e-4 (fp32)."""
    from loratune.models import load_model

    model, tok = load_model("smollm2-135m-instruct")
    ids = tok("Convert the request into a command: start a 5 minute timer",
              return_tensors="pt")["input_ids"]

    def out(m):
        with torch.no_grad():
            return m(input_ids=ids).logits

    add_adapter(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    randomize_lora(model, scale=0.02)
    ours = out(model)
    save_adapter(model, tmp_path / "ours")
    from loratune.adapters import delete_adapter

    delete_adapter(model, "default")
    base_logits = out(model)
    assert (ours - base_logits).abs().max() > 1e-2  # the adapter really changes the output
    theirs = peft.PeftModel.from_pretrained(model, tmp_path / "ours")
    assert (out(theirs) - ours).abs().max().item() < 1e-4
    theirs.save_pretrained(tmp_path / "peft")
    plain = theirs.unload()
    load_adapter(plain, tmp_path / "peft")
    assert (out(plain) - ours).abs().max().item() < 1e-4
