"""Adapters on fused experts through the other consumers: the streamed merge (per-expert and
fused checkpoints) and the server (refused through the method's record). `export gguf
--adapter-only` writes them as llama.cpp's 3-D pairs: tests/export/test_gguf_moe.py."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from loratune.adapters import add_adapter, save_adapter
from loratune.config import LoraConfig
from loratune.export.merge import merge_folder, read_adapters
from tests.adapters.test_expert_lora import logits, randomize, tiny_moe


def _adapted(family, tmp_path, targets=("q_proj", "experts")):
    base = tiny_moe(family)
    base.save_pretrained(tmp_path / "base")
    model = tiny_moe(family)
    add_adapter(model, LoraConfig(r=2, lora_alpha=8, target_modules=list(targets)))
    randomize(model)
    save_adapter(model, tmp_path / "a")
    return model


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_merged_folder_of_per_expert_checkpoint_has_the_adapted_logits(family, tmp_path):
    model = _adapted(family, tmp_path)
    report = merge_folder(tmp_path / "base", read_adapters([tmp_path / "a"], None),
                          tmp_path / "m")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    assert (logits(merged) - logits(tiny_moe(family))).abs().max() > 1e-3
    torch.testing.assert_close(logits(merged), logits(model), atol=1e-5, rtol=0)
    assert report.merged_modules == 2 * 2  # q_proj and experts of 2 layers


def test_fused_checkpoint_gets_every_experts_update_at_once(tmp_path):
    model = _adapted("qwen3_moe", tmp_path, targets=("experts",))
    state = {k: v for k, v in tiny_moe("qwen3_moe").state_dict().items()}
    (tmp_path / "fused").mkdir()
    save_file(state, tmp_path / "fused" / "model.safetensors")
    (tmp_path / "fused" / "config.json").write_text((tmp_path / "base" / "config.json").read_text())
    merge_folder(tmp_path / "fused", read_adapters([tmp_path / "a"], [0.5]), tmp_path / "m")
    out = load_file(tmp_path / "m" / "model.safetensors")
    host = model.model.layers[1].mlp.experts
    for param in ("gate_up_proj", "down_proj"):
        key = f"model.layers.1.mlp.experts.{param}"
        want = state[key] + 0.5 * host.adapters["default"].delta(param).detach()
        torch.testing.assert_close(out[key], want, atol=1e-6, rtol=0)


def test_server_refuses_experts_it_cannot_route_naming_them(tmp_path):
    """LoRA on fused experts is served (tests/serve/test_serve_moe.py) where a `gate` or
    `router` module routes the layer; a layer routed otherwise is refused by name."""
    from loratune.serve.pool import read_lora
    from loratune.serve.types import BadAdapter
    from tests.models.test_moe_families import build_moe

    model = build_moe("qwen3_moe")[0]
    add_adapter(model, LoraConfig(r=2, target_modules=["experts"]))
    save_adapter(model, tmp_path / "a")
    served = build_moe("qwen3_moe")[0]
    for layer in served.model.layers:  # a layer whose router the server cannot find
        layer.mlp.selector = layer.mlp.gate
        del layer.mlp.gate
    with pytest.raises(BadAdapter, match=r"experts at model.layers.0.mlp.experts "
                                         r"\(Qwen3MoeSparseMoeBlock\) are served for layers "
                                         r"routed by a `gate` or `router`"):
        read_lora("moe", tmp_path / "a", served)
