import pytest

from loratune.config import ConfigError, load_config


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("output_dir: out\nadapter:\n  r: 4\n  target_modules: [q_proj, v_proj]\n"
                    "train:\n  lr: 0.001\n")
    cfg = load_config(path, ["train.lr=5e-4", "adapter.lora_alpha=16", "data.packing=false"])
    assert cfg.adapter.r == 4 and cfg.adapter.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.lr == 5e-4 and cfg.adapter.lora_alpha == 16 and cfg.data.packing is False


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


def test_option_of_another_method_is_named_with_its_method():
    import pytest

    from loratune.config import ConfigError, build_config

    # Every method with an `r` is named (the list grows as methods are added).
    with pytest.raises(ConfigError, match=r"method 'ia3' has no option 'r' \(an option of lora, "
                                          r"dora, moe_lora, loha, lokr[^)]*\)\. Options of ia3: "
                                          r"target_modules"):
        build_config({"adapter": {"method": "ia3", "r": 4}})
    with pytest.raises(ConfigError, match=r"'foo' \(no method has it\)"):
        build_config({"adapter": {"method": "prompt", "foo": 1}})
    with pytest.raises(ConfigError, match=r"adapter.num_experts.*greater than or equal to 2"):
        build_config({"adapter": {"method": "moe_lora", "num_experts": 0}})
    with pytest.raises(ConfigError, match="unknown method 'lorra'; choose one of lora, dora"):
        build_config({"adapter": {"method": "lorra"}})


def test_the_config_package_reexports_its_modules_and_imports_no_torch():
    """`from loratune.config import X` works for whatever config/run, methods and base define,
    and parsing stays cheap: the package (commands too) imports no torch."""
    import subprocess
    import sys

    code = ("import sys, inspect, loratune.config as c, loratune.config.commands\n"
            "from loratune.config import base, methods, run\n"
            "for m in (base, methods, run):\n"
            "    own = [n for n, v in vars(m).items() if not n.startswith('_') and\n"
            "           (n.isupper() or getattr(v, '__module__', None) == m.__name__)]\n"
            "    missing = [n for n in own if getattr(c, n, None) is not getattr(m, n)]\n"
            "    assert own and not missing, (m.__name__, missing)\n"
            "assert 'torch' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)
