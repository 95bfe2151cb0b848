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


def _lora_folder(tmp_path, **config_edits):
    """A LoRA folder (rank 4; v_proj rank 2 by rank_pattern) whose adapter_config.json is then
    edited, so that it disagrees with the tensors."""
    import json

    model = tiny_llama()
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                rank_pattern={"v_proj": 2})
    randomize_lora(model)
    folder = save_adapter(model, tmp_path / "a")
    config_file = folder / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config.update(config_edits)
    config_file.write_text(json.dumps(config))
    return folder


def _every_reader_refuses(folder, tmp_path, message):
    """merge, training's init_from (load_adapter) and serve refuse the folder in the same words."""
    from loratune.adapters import load_adapter
    from loratune.config import ConfigError, build_config
    from loratune.export.merge import read_adapters
    from loratune.serve.types import BadAdapter
    from loratune.train.objectives import start_adapter

    with pytest.raises(ValueError) as merge_err:
        read_adapters([folder], None)
    with pytest.raises(ValueError) as load_err:
        load_adapter(tiny_llama(), folder)
    cfg = build_config({"output_dir": str(tmp_path / "run"), "data": {"train": "x.jsonl"},
                        "adapter": {"init_from": str(folder)}})
    with pytest.raises(ConfigError) as init_err:
        start_adapter(cfg, tiny_llama(), None)
    with pytest.raises(BadAdapter) as serve_err:
        read_lora("a", folder, tiny_llama())
    assert str(merge_err.value) == str(load_err.value) == message
    assert str(init_err.value) == f"adapter.init_from: {message}"
    assert str(serve_err.value) == f"adapter 'a': {message}"


def test_config_r_that_disagrees_with_the_tensors_is_refused_by_every_reader(tmp_path):
    folder = _lora_folder(tmp_path, r=8)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    _every_reader_refuses(folder, tmp_path, (
        f"{folder / 'adapter_config.json'}: r is 8, but adapter_model.safetensors holds {key} of "
        "shape (4, 32), rank 4; the config and the tensors disagree (the update is scaled by "
        "lora_alpha / r, so a wrong r changes it): fix r or rank_pattern"))


def test_rank_pattern_that_disagrees_with_the_tensors_is_refused_by_every_reader(tmp_path):
    folder = _lora_folder(tmp_path, rank_pattern={"v_proj": 3})
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"
    _every_reader_refuses(folder, tmp_path, (
        f"{folder / 'adapter_config.json'}: rank_pattern['v_proj'] is 3, but "
        f"adapter_model.safetensors holds {key} of shape (2, 32), rank 2; the config and the "
        "tensors disagree (the update is scaled by lora_alpha / r, so a wrong r changes it): "
        "fix r or rank_pattern"))


@pytest.mark.parametrize("field,value,expected", [
    ("loftq_config", {"loftq_bits": 4, "loftq_iter": 1000000}, "loftq_iter"),
    ("init_lora_weights", "pissa_niter_1000000000", "init_lora_weights"),
    ("init_lora_weights", "pissa_niter_2.5", "init_lora_weights"),
])
def test_a_files_costly_init_options_are_bounded(tmp_path, field, value, expected):
    """A downloaded adapter_config naming a million LoftQ alternations (NF4 + SVD per layer at
    load) or a huge / non-integer PiSSA niter is refused, naming the file and the field."""
    import json

    from loratune.adapters.peft_format import AdapterError, read_adapter_config

    init = "loftq" if field == "loftq_config" else value
    (tmp_path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
        "init_lora_weights": init, field: value}))
    with pytest.raises(AdapterError, match=rf"(?s)adapter_config.json.*{expected}"):
        read_adapter_config(tmp_path)
