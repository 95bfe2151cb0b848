"""QLoRA with LoRA on the routed experts (issue 30): the experts held in 4 bits
(models/moe_experts.py QuantizedExperts) take the per-expert adapter (adapters/expert_lora.py)
inside their grouped forward; train, save, reload, and `loratune merge --qlora` into a folder
transformers loads with the logits of the 4-bit base + adapter."""

import json
import math
import re

import pytest
import torch

from loratune.adapters import load_adapter
from loratune.adapters.expert_lora import ExpertHost
from loratune.cli import main
from loratune.config import ModelConfig, QuantConfig, build_config
from loratune.models import load_model
from loratune.models.moe_experts import QuantizedExperts
from loratune.train import train
from families import family_conversation
from tests.models.test_moe_families import MOE, build_moe, logits, nf4_round_trip_experts

FAMILIES = ["qwen3_moe", "mixtral", "olmoe"]


def nf4(folder):
    return ModelConfig(name=str(folder), quantization=QuantConfig(type="nf4"))


def train_qlora_experts(folder, tmp_path, name):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": family_conversation(True)}) + "\n"
                            for _ in range(4)))
    cfg = build_config({
        "output_dir": str(tmp_path / "run"),
        "model": {"name": str(folder), "quantization": {"type": "nf4"}},
        "adapter": {"method": "lora", "r": 4, "target_modules": MOE[name][1] + ["experts"]},
        "data": {"train": str(data), "max_length": 128},
        "train": {"max_steps": 2, "batch_size": 2, "lr": 5e-2, "warmup_ratio": 0.0}})
    return train(cfg, quiet=True)


@pytest.mark.parametrize("name", FAMILIES)
def test_qlora_experts_train_expert_lora_reload_and_merge_qlora(name, tmp_path, capsys):
    """The 4-bit experts are wrapped by the expert adapter's host; training moves the experts'
    B; reloaded on the 4-bit base the adapter gives the logits of the fp32 model whose weights
    took the same NF4 round trip + the same adapter (1e-4); `merge --qlora nf4` writes a folder
    whose logits equal the 4-bit base + adapter (1e-4), and a merge without the round trip
    does not."""
    from transformers import AutoModelForCausalLM

    model, tok = build_moe(name)
    folder = tmp_path / "base"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    result = train_qlora_experts(folder, tmp_path, name)
    assert all(math.isfinite(h["loss"]) for h in result.history)
    adapter = result.adapter_dir
    raw = json.loads((adapter / "adapter_config.json").read_text())
    assert raw["target_parameters"] == ["experts.gate_up_proj", "experts.down_proj"]

    live, _ = load_model(nf4(folder))
    before = logits(live)
    load_adapter(live, adapter)
    hosts = [m for m in live.modules() if isinstance(m, ExpertHost)]
    assert hosts and all(isinstance(h.base_layer, QuantizedExperts) for h in hosts)
    assert any(h.adapters["default"].down_proj_B.abs().max() > 0 for h in hosts)  # trained
    adapted = logits(live)
    assert (adapted - before).abs().max() > 1e-4
    oracle = nf4_round_trip_experts(load_model(str(folder))[0])  # linears and experts
    load_adapter(oracle, adapter)
    torch.testing.assert_close(logits(oracle), adapted, atol=1e-4, rtol=0)

    out = tmp_path / "merged"
    assert main(["merge", "--model", str(folder), "--adapter", str(adapter), "--out", str(out),
                 "--qlora", "nf4", "--check"]) == 0
    gap = re.search(r"\(4-bit base\): (\S+)", capsys.readouterr().out)
    assert gap and float(gap.group(1)) < 1e-4
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(merged), adapted, atol=1e-4, rtol=0)
    assert main(["merge", "--model", str(folder), "--adapter", str(adapter),
                 "--out", str(tmp_path / "plain")]) == 0
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float32)
    assert float((logits(plain.eval()) - adapted).abs().max()) > 1e-3  # the round trip matters


def test_merging_into_4bit_experts_in_place_is_refused(tmp_path):
    from loratune.adapters import add_adapter
    from loratune.adapters.inject import merge
    from loratune.config import LoraConfig
    from loratune.models.quantize import quantize_model

    model, _ = build_moe("qwen3_moe")
    quantize_model(model, QuantConfig(type="nf4"))
    add_adapter(model, LoraConfig(r=2, target_modules=["experts"]))
    with pytest.raises(ValueError, match=r"4-bit experts .*merge --qlora"):
        merge(model)
