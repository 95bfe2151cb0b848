"""Every command's options are one typed config, from flags or a YAML file (flags win), with
errors that name the key; `loratune plan run.yaml` estimates the training run the file holds."""

import shlex
from pathlib import Path

import pytest
import yaml

from loratune.cli import build_parser, main
from loratune.config.commands import (ChatConfig, CommandConfig, EvalCommandConfig,
                                      ExportGgufConfig, ExportHfConfig, GenerateConfig,
                                      MergeConfig, PlanConfig, ServeConfig)
from loratune.config import DEFAULT_MODEL, ConfigError, QuantConfig
from loratune.flags import config_from_args

DEMO = Path(__file__).parent.parent / "examples" / "demo.yaml"

# command words, its config class, the options it cannot run without
COMMANDS = [
    (["serve"], ServeConfig, {}),
    (["merge"], MergeConfig, {"adapter": ["a"], "out": "o"}),
    (["export", "hf"], ExportHfConfig, {"out": "o"}),
    (["export", "gguf"], ExportGgufConfig, {"out": "o.gguf"}),
    (["chat"], ChatConfig, {}),
    (["generate"], GenerateConfig, {"prompt": ["hi"]}),
    (["eval"], EvalCommandConfig, {"data": "d.jsonl"}),
    (["plan"], PlanConfig, {}),
]


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def parsed(words: list[str], cls: type[CommandConfig]):
    """The typed config the command line `loratune WORDS` runs with."""
    return config_from_args(cls, build_parser().parse_args(words))


def test_serve_yaml_reads_back_and_flags_override_it(tmp_path):
    data = {"model": {"name": "my-base", "device": "cuda:1", "dtype": "bfloat16",
                      "quantization": {"type": "fp4", "blocksize": 128}},
            "adapters": "adapters/", "host": "0.0.0.0", "port": 9000, "api_key": "k",
            "max_body_bytes": 1024, "route": "zh=a,en=b", "threads": 2, "log_level": "warning"}
    path = write_yaml(tmp_path / "serve.yaml", data)
    cfg = ServeConfig.load(path)
    assert cfg.model_dump(exclude_unset=True) == data
    assert cfg.model.quantization == QuantConfig(type="fp4", blocksize=128)
    assert cfg.max_batch == 16  # unset keys keep the defaults
    over = parsed(["serve", "--config", str(path), "--port", "9001", "--quantize", "nf4",
                   "--device", "cpu"], ServeConfig)
    assert over.port == 9001 and over.model.device == "cpu" and over.api_key == "k"
    assert over.model.quantization == QuantConfig(type="nf4", blocksize=128)
    assert over.model.name == "my-base" and over.max_body_bytes == 1024


def test_merge_yaml_reads_back_and_comma_weights_flag(tmp_path):
    data = {"model": "base/", "adapter": ["a", "b"], "weights": [0.7, 0.3], "out": "merged/",
            "dtype": "bfloat16", "qlora": "nf4", "check": True, "shard_size": "500MB"}
    path = write_yaml(tmp_path / "merge.yaml", data)
    assert MergeConfig.load(path).model_dump() == {**data, "overwrite": False}
    flags = parsed(["merge", "--model", "base/", "--adapter", "a", "--adapter", "b", "--weights",
                    "0.7,0.3", "--out", "merged/", "--dtype", "bfloat16", "--qlora", "nf4",
                    "--check", "--shard-size", "500MB"], MergeConfig)
    assert flags == MergeConfig.load(path)


def test_plan_yaml_reads_back_and_prints_what_its_flags_print(tmp_path, capsys):
    data = {"model": "13b", "method": "lora", "batch": 4, "seq": 1024, "rank": 8,
            "dtype": "fp16", "optimizer": "adamw8bit", "checkpointing": False,
            "gpu": "rtx4090", "gpus": 2, "parallel": "fsdp"}
    path = write_yaml(tmp_path / "plan.yaml", data)
    assert PlanConfig.load(path).model_dump(exclude_unset=True) == data
    assert main(["plan", "--config", str(path)]) == 0
    from_yaml = capsys.readouterr().out
    assert main(["plan", "--model", "13b", "--method", "lora", "--batch", "4", "--seq", "1024",
                 "--rank", "8", "--dtype", "fp16", "--optimizer", "adamw8bit",
                 "--no-checkpointing", "--gpu", "rtx4090", "--gpus", "2", "--parallel",
                 "fsdp"]) == 0
    assert from_yaml == capsys.readouterr().out
    assert "llama-2-13b" in from_yaml and "per GPU of 2 (fsdp" in from_yaml


@pytest.mark.parametrize("words, cls, needed", COMMANDS)
def test_unknown_key_is_named(tmp_path, capsys, words, cls, needed):
    path = write_yaml(tmp_path / "c.yaml", {**needed, "max_new_tokenz": 3})
    with pytest.raises(ConfigError, match=r"unknown key 'max_new_tokenz'"):
        cls.load(path)
    assert main([*words, "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'max_new_tokenz'" in err and str(path) in err


@pytest.mark.parametrize("words, cls, needed", COMMANDS)
def test_wrong_type_names_the_key_and_its_flag(tmp_path, words, cls, needed):
    key, flag = next((k, f) for f, k in cls.flag_keys().items() if "." not in k
                     and cls.model_fields[k].annotation in (int, float, bool))
    path = write_yaml(tmp_path / "c.yaml", {**needed, key: "lots"})
    with pytest.raises(ConfigError, match=rf"key '{key}' \({flag}\): .*'lots'"):
        cls.load(path)


def test_a_key_inside_the_model_section_is_named(tmp_path):
    path = write_yaml(tmp_path / "s.yaml", {"model": {"devise": "cuda"}})
    with pytest.raises(ConfigError, match=r"unknown key 'model\.devise'"):
        ServeConfig.load(path)
    path = write_yaml(tmp_path / "s.yaml", {"model": {"dtype": "fp8"}})
    with pytest.raises(ConfigError, match=r"key 'model\.dtype' \(--dtype\): Input should be"):
        ServeConfig.load(path)


def test_missing_option_and_rules_across_keys(tmp_path, capsys):
    assert main(["merge", "--adapter", "a"]) == 2
    assert "missing key 'out' (--out)" in capsys.readouterr().err
    assert main(["generate", "--model", "/nonexistent"]) == 2
    assert "give input (--input FILE) or prompt" in capsys.readouterr().err
    assert main(["generate", "--input", "x.jsonl", "--prompt", "hi"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["serve", "--max-body-bytes", "0"]) == 2
    assert "key 'max_body_bytes' (--max-body-bytes)" in capsys.readouterr().err


def test_every_command_defaults_to_the_one_default_model():
    assert DEFAULT_MODEL == "smollm2-135m-instruct"
    for words, cls, needed in COMMANDS[:-1]:  # plan's default is a 7B shape
        cfg = cls.load(None, needed)
        assert (cfg.model if isinstance(cfg.model, str) else cfg.model.name) == DEFAULT_MODEL


def plan_output(capsys, argv) -> list[str]:
    assert main(["plan", *argv]) == 0
    return capsys.readouterr().out.splitlines()


def test_plan_of_a_training_config_equals_the_flags_form(capsys):
    run = plan_output(capsys, [str(DEMO)])
    # examples/demo.yaml: the embedded model, LoRA r=16, 2 rows of 256 tokens, float32 on cpu,
    # no gradient checkpointing, AdamW, grad_accum 1
    flags = ["--model", "smollm2-135m-instruct", "--method", "lora", "--rank", "16",
             "--batch", "2", "--seq", "256", "--dtype", "fp32", "--device", "cpu",
             "--no-checkpointing", "--optimizer", "adamw"]
    assert run[1:] == plan_output(capsys, flags)
    assert "lora, batch 2 x seq 256, r=16, fp32, adamw, without gradient checkpointing" in run[1]
    shown = run[0].split("as flags: loratune plan ", 1)[1]   # the command line it printed
    assert run[1:] == plan_output(capsys, shlex.split(shown))


def test_plan_of_a_qlora_run_with_overrides_and_a_gpu(capsys):
    run = plan_output(capsys, [str(DEMO), "model.quantization.type=nf4",
                               "model.quantization.compute_dtype=bfloat16",
                               "train.gradient_checkpointing=true", "train.batch_size=4",
                               "train.grad_accum=4", "train.optimizer=adamw8bit",
                               "--gpu", "rtx3060"])
    flags = ["--model", "smollm2-135m-instruct", "--method", "qlora", "--rank", "16",
             "--batch", "4", "--seq", "256", "--dtype", "bf16", "--device", "cpu",
             "--checkpointing", "--optimizer", "adamw8bit", "--gpu", "rtx3060",
             "--target-batch", "16"]
    assert run[1:] == plan_output(capsys, flags)
    assert "qlora, batch 4 x seq 256, r=16, bf16, adamw8bit, with gradient" in run[1]
    assert any("effective batch 16" in line for line in run)


def test_plan_of_a_run_refuses_flags_the_run_decides(capsys, tmp_path):
    assert main(["plan", str(DEMO), "--batch", "8"]) == 2
    err = capsys.readouterr().err
    assert "--batch" in err and "train.batch_size" in err
    ia3 = write_yaml(tmp_path / "ia3.yaml", {"adapter": {"method": "ia3"}})
    assert main(["plan", str(ia3)]) == 2
    assert "adapter.method 'ia3' has no rank" in capsys.readouterr().err
    assert main(["plan", str(DEMO), "train.batch_sise=4"]) == 2
    assert "unknown key 'train.batch_sise'" in capsys.readouterr().err


def test_plan_of_a_run_says_what_it_leaves_out(capsys, tmp_path):
    run = plan_output(capsys, [str(DEMO), "adapter.method=dora",
                               "adapter.target_modules=[q_proj,v_proj]"])
    notes = [line for line in run if line.startswith("note: ")]
    assert len(notes) == 2 and "dora" in notes[0] and "q_proj" in notes[1]
    moe = plan_output(capsys, [str(DEMO), "adapter={method: moe_lora, r: 4, num_experts: 4}"])
    assert "r=16" in moe[1]   # four rank-4 experts hold the weights of one rank-16 LoRA


# -- one grammar: key=value overrides anywhere among the flags ------------------------------------
# command words with overrides after a flag, the overrides parsed, one flag's (dest, value)
ANY_ORDER = [
    (["train", "c.yaml", "--resume", "train.max_steps=7"], ["train.max_steps=7"],
     ("resume", True)),
    (["train", "c.yaml", "--nproc", "2", "train.grad_accum=2"], ["train.grad_accum=2"],
     ("nproc", 2)),
    (["train", "c.yaml", "a.b=1", "--overwrite", "c.d=2"], ["a.b=1", "c.d=2"],
     ("overwrite", True)),
    (["demo", "--output-dir", "x", "train.max_steps=3"], ["train.max_steps=3"],
     ("output_dir", "x")),
    (["compare", "c.yaml", "--methods", "lora", "train.max_steps=3"], ["train.max_steps=3"],
     ("methods", "lora")),
    (["tune-rank", "c.yaml", "--ranks", "2,4", "train.max_steps=3"], ["train.max_steps=3"],
     ("ranks", "2,4")),
    (["plan", "r.yaml", "--gpu", "24GB", "train.batch_size=4"], ["train.batch_size=4"],
     ("gpu", "24GB")),
    (["serve", "--port", "9000", "max_batch=3", "--threads", "1"], ["max_batch=3"],
     ("port", 9000)),
    (["export", "gguf", "--out", "o.gguf", "type=f32"], ["type=f32"], ("out", "o.gguf")),
]


@pytest.mark.parametrize("words, overrides, flag", ANY_ORDER)
def test_overrides_may_follow_flags(words, overrides, flag):
    args = build_parser().parse_args(words)
    assert args.overrides == overrides
    assert getattr(args, flag[0]) == flag[1]


@pytest.mark.parametrize("words, bad", [(["train", "c.yaml", "--resume", "oops"], "oops"),
                                        (["train", "c.yaml", "--bogus", "a=1"], "--bogus"),
                                        (["models", "list", "x", "a=1"], "a=1")])  # no overrides
def test_a_leftover_that_is_not_key_value_is_an_error(words, bad, capsys):
    with pytest.raises(SystemExit) as err:
        build_parser().parse_args(words)
    assert err.value.code == 2
    assert f"error: unrecognized arguments: {bad}\n" in capsys.readouterr().err


def test_key_value_sets_a_command_option_after_the_flags(tmp_path, capsys):
    path = write_yaml(tmp_path / "serve.yaml", {"port": 9000, "max_batch": 4})
    cfg = parsed(["serve", "--config", str(path), "--threads", "1", "max_batch=3",
                  "model.dtype=bfloat16"], ServeConfig)
    assert (cfg.port, cfg.max_batch, cfg.threads, cfg.model.dtype) == (9000, 3, 1, "bfloat16")
    gguf = parsed(["export", "gguf", "--out", "o.gguf", "type=q8_0", "adapter=[a, b]"],
                  ExportGgufConfig)
    assert gguf.type == "q8_0" and gguf.adapter == ["a", "b"]
    assert main(["serve", "--port", "1", "max_bach=3"]) == 2
    assert "unknown key 'max_bach'" in capsys.readouterr().err
    assert main(["serve", "stray"]) == 2   # a word that is no key=value, before any flag
    assert "'stray' must look like key=value" in capsys.readouterr().err


def test_plan_overrides_set_the_run_not_the_plan(capsys):
    flags_first = plan_output(capsys, [str(DEMO), "--gpu", "rtx3060", "train.batch_size=4"])
    overrides_first = plan_output(capsys, [str(DEMO), "train.batch_size=4", "--gpu", "rtx3060"])
    assert flags_first == overrides_first and "batch 4 x seq 256" in flags_first[1]
