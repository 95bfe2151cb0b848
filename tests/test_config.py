import pytest

from loratune.config import ConfigError, load_config


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("output_dir: out\nadapter:\n  r: 4\n  target_modules: [q_proj, v_proj]\n"
                    "train:\n  lr: 0.001\n")
    cfg = load_config(path, ["train.lr=5e-4", "adapter.lora_alpha=16", "data.packing=false"])
    assert cfg.adapter.r == 4 and cfg.adapter.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.lr == 5e-4 and cfg.adapter.scaling == 4.0 and cfg.data.packing is False


def test_unknown_key_and_wrong_type_name_the_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  learning_rate: 0.1\n  batch_size: many\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert "unknown key 'train.learning_rate'" in text
    assert "key 'train.batch_size'" in text and str(path) in text


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(None, ["train.lr=1", "train.lr.x=1"])
