"""Every method through the same `train` config: loss falls, the adapter file reloads exactly."""

import json

import pytest
import torch

from loratune.adapters import load_adapter
from loratune.config import build_config
from loratune.train import train
from tiny import tiny_llama

# method -> (adapter options, lr, required loss drop). IA³'s few scales move a random tiny
# model's near-uniform output only a little, so its bar is lower.
METHODS = {
    "ia3": ({}, 0.3, 0.05),
    "moe_lora": ({"r": 4, "lora_alpha": 8, "num_experts": 3, "top_k": 2}, 5e-2, 0.1),
    "bottleneck": ({"bottleneck_size": 16}, 2e-2, 0.1),
    "prompt": ({"num_virtual_tokens": 8}, 0.3, 0.02),
    "prefix": ({"num_virtual_tokens": 8}, 5e-2, 0.05),
    "adalora": ({"init_r": 6, "target_r": 3, "tinit": 2, "tfinal": 4, "deltaT": 2,
                 "lora_alpha": 8}, 5e-2, 0.1),
    "loha": ({"r": 4, "alpha": 8}, 5e-2, 0.1),
    "lokr": ({"r": 2, "alpha": 4, "decompose_both": True}, 5e-2, 0.1),
    "vera": ({"r": 16}, 5e-2, 0.1),
    "oft": ({"oft_block_size": 8}, 5e-2, 0.1),
}
PEFT_TYPES = {"ia3", "adalora", "prompt", "prefix", "loha", "lokr", "vera", "oft"}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_trains_saves_and_reloads(tmp_path, data_file, smol_tokenizer, method):
    options, lr, drop = METHODS[method]
    cfg = build_config({
        "output_dir": str(tmp_path / method),
        "adapter": {"method": method, **options},
        "data": {"train": str(data_file), "max_length": 64},
        "train": {"max_steps": 16, "batch_size": 4, "lr": lr, "warmup_ratio": 0.0},
    })
    model = tiny_llama(vocab=len(smol_tokenizer))
    result = train(cfg, model=model, tokenizer=smol_tokenizer, quiet=True)
    losses = [h["loss"] for h in result.history]
    # Two steps cover the 8 examples once: compare the first epoch with the last.
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - drop, losses
    summary = json.loads((result.output_dir / "run_summary.json").read_text())
    assert summary["method"] == method and summary["peak_rss_mib"] > 0
    if method == "moe_lora":
        assert all(h.get("extra_loss", 0) > 0 for h in result.history)

    ids = torch.tensor([[5, 900, 17, 4000, 31]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        fresh = tiny_llama(vocab=len(smol_tokenizer))
        load_adapter(fresh, result.adapter_dir, tokenizer=smol_tokenizer)
        torch.testing.assert_close(fresh(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
    if method == "adalora":
        assert summary["total_rank"] == 3 * len(summary["final_ranks"])
    if method in PEFT_TYPES:  # the file loads in PEFT with the same logits
        peft = pytest.importorskip("peft")
        theirs = peft.PeftModel.from_pretrained(tiny_llama(vocab=len(smol_tokenizer)),
                                                result.adapter_dir)
        with torch.no_grad():
            torch.testing.assert_close(theirs(input_ids=ids).logits[:, -ids.shape[1]:], expected,
                                       atol=1e-5, rtol=0)


def test_too_many_virtual_tokens_for_the_context(tmp_path, data_file, smol_tokenizer):
    cfg = build_config({
        "output_dir": str(tmp_path / "p"),
        "adapter": {"method": "prompt", "num_virtual_tokens": 100},
        "data": {"train": str(data_file), "max_length": 64},
    })
    model = tiny_llama(vocab=len(smol_tokenizer))  # 128 positions
    with pytest.raises(ValueError, match=r"num_virtual_tokens=100 plus data.max_length=64 exceeds "
                                         r"the model's context of 128 positions; use at most 64"):
        train(cfg, model=model, tokenizer=smol_tokenizer, quiet=True)
    assert not (tmp_path / "p").exists()


def test_lora_inside_a_bottleneck_host_keeps_peft_key_names(tmp_path):
    from loratune.adapters import add_adapter, save_adapter, set_active
    from loratune.config import BottleneckConfig, LoraConfig
    from safetensors.torch import load_file
    from tiny import randomize_lora

    peft = pytest.importorskip("peft")
    model = tiny_llama()
    add_adapter(model, BottleneckConfig(bottleneck_size=4), "bn")
    add_adapter(model, LoraConfig(r=4, target_modules=["gate_proj", "q_proj"]), "lo")
    randomize_lora(model)
    set_active(model, "lo")
    save_adapter(model, tmp_path / "lo", "lo")
    keys = load_file(str(tmp_path / "lo" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight" in keys
    assert not any("base_layer" in k for k in keys)
    ids = torch.tensor([[3, 7, 11, 2]])
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "lo")
        torch.testing.assert_close(theirs(input_ids=ids).logits, model(input_ids=ids).logits,
                                   atol=1e-5, rtol=0)
