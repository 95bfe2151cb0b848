"""The one PEFT-folder module: key layout, rank/alpha patterns and the LoRA scale, as every
reader (live load, server, merge, GGUF export) sees them."""

import pytest
import torch

from loratune.adapters import add_adapter, save_adapter
from loratune.adapters.host import adapted_layers
from loratune.adapters.peft_format import (LORA_KINDS, file_key, lora_scale, module_path,
                                           read_peft_folder, split_key)
from loratune.config import LoraConfig
from loratune.serve.pool import read_lora
from tiny import randomize_lora, tiny_llama


def test_scale_is_alpha_over_r_or_over_sqrt_r():
    assert lora_scale(16, 4, use_rslora=False) == 4.0
    assert lora_scale(16, 4, use_rslora=True) == 8.0


def test_keys_split_back_into_module_path_and_kind():
    key = file_key("model.layers.0.mlp.down_proj", "lora_A.weight")
    assert key == "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"
    assert split_key(key, LORA_KINDS) == ("model.layers.0.mlp.down_proj", "lora_A.weight")
    assert split_key(key, ("lora_A",)) is None  # AdaLoRA's kind is not LoRA's
    assert module_path(key) == "model.layers.0.mlp.down_proj.lora_A.weight"
    assert module_path("prompt_embeddings") is None


@pytest.mark.parametrize("rslora", [False, True])
def test_readers_give_each_module_its_live_rank_and_scale(tmp_path, rslora):
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, use_rslora=rslora,
                                  target_modules=["q_proj", "v_proj"]),
                rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3.0})
    randomize_lora(model)
    save_adapter(model, tmp_path / "a")
    live = {p: layer.adapters["default"] for p, layer in adapted_layers(model)}
    folder = read_peft_folder(tmp_path / "a")
    pairs = folder.lora_pairs()
    assert set(pairs) == set(live) and len(live) == 4
    assert {folder.rank(p) for p in live} == {2, 4}
    for path, (a, _) in pairs.items():
        assert folder.rank(path) == a.shape[0] == live[path].r
        assert folder.scale(path, a.shape[0]) == pytest.approx(live[path].scaling)
    served = read_lora("a", tmp_path / "a", tiny_llama()).layers  # the server's reader
    for path, (a, scaled_b) in served.items():
        torch.testing.assert_close(scaled_b @ a, live[path].delta_weight())
