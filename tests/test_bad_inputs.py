"""Damaged files and mistaken inputs: one-line errors that name the file, never a traceback.

Tiny random Llamas (2 or 4 layers) with the real SmolLM2 tokenizer; seconds in all.
"""

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from loratune.adapters import AdapterError, add_adapter, load_adapter, save_adapter
from loratune.cli import main
from loratune.config import DataConfig, LoraConfig, QuantConfig
from loratune.data import DataError, build_examples, read_records
from loratune.models import ModelNotFound, resolve_model
from loratune.readers import CorruptFileError
from tiny import tiny_llama

WEIGHTS = "adapter_model.safetensors"


def esc(path) -> str:
    return re.escape(str(path))


def llama(layers: int, vocab: int = 128) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def adapter(folder: Path, layers: int = 2, vocab: int = 128) -> Path:
    model = llama(layers, vocab)
    add_adapter(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), "default")
    return save_adapter(model, folder)


def truncate(path: Path, keep: int = -10) -> Path:
    path.write_bytes(path.read_bytes()[:keep])
    return path


def garble(path: Path) -> Path:
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32  # inside the JSON header
    path.write_bytes(bytes(data))
    return path


def one_line_error(capsys, command: str, *names: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"loratune {command}: error: "), err
    for name in names:
        assert name in err, err
    return err


# --- corrupt safetensors: adapters, model weights, every reader ---------------------------------

@pytest.mark.parametrize("damage", [truncate, garble])
def test_damaged_adapter_file_is_named(tmp_path, damage):
    folder = adapter(tmp_path / "ad")
    damage(folder / WEIGHTS)
    with pytest.raises(CorruptFileError, match=rf"{esc(folder / WEIGHTS)}: not a readable "
                                               r"safetensors file \(.*\); the file is truncated "
                                               r"or damaged$"):
        load_adapter(llama(2), folder)


@pytest.mark.parametrize("command", ["chat", "eval", "merge"])
def test_cli_damaged_adapter_one_line_exit_2(tmp_path, tiny_folder, smol_tokenizer, capsys,
                                             command):
    folder = adapter(tmp_path / "ad", vocab=len(smol_tokenizer))
    truncate(folder / WEIGHTS)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "say a", "output": "a"}) + "\n")
    extra = {"chat": ["--prompt", "hi"], "eval": ["--data", str(data)],
             "merge": ["--out", str(tmp_path / "merged")]}[command]
    assert main([command, "--model", str(tiny_folder), "--adapter", str(folder), *extra]) == 2
    one_line_error(capsys, command, str(folder / WEIGHTS), "truncated or damaged")
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("damage", [truncate, garble])
def test_damaged_model_weights_are_named(tmp_path, tiny_folder, capsys, damage):
    folder = tmp_path / "model"
    folder.mkdir()
    for item in tiny_folder.iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    damage(folder / "model.safetensors")
    with pytest.raises(CorruptFileError, match=f"{esc(folder / 'model.safetensors')}: not a "):
        resolve_model(str(folder))
    assert main(["chat", "--model", str(folder), "--prompt", "hi"]) == 2
    one_line_error(capsys, "chat", str(folder / "model.safetensors"))


def test_every_safetensors_reader_names_a_damaged_file(tmp_path):
    """The merge, GGUF, server, 4-bit and streamed readers all go through loratune.readers."""
    from loratune.export.gguf_file import write_lora_gguf
    from loratune.export.merge import read_adapters
    from loratune.export.safetensors_io import read_index
    from loratune.models.load_4bit import load_quantized
    from loratune.serve.pool import read_lora
    from loratune.serve.types import BadAdapter

    folder = adapter(tmp_path / "ad")
    bad = truncate(folder / WEIGHTS)
    base = tmp_path / "base"
    llama(2).save_pretrained(base)
    readers = [lambda: read_adapters([folder], None),
               lambda: write_lora_gguf(folder, base, tmp_path / "a.gguf")]
    for read in readers:
        with pytest.raises(CorruptFileError, match=f"{esc(bad)}: not a readable safetensors"):
            read()
    with pytest.raises(BadAdapter, match=f"{esc(bad)}: not a readable safetensors file"):
        read_lora("ad", folder, llama(2))
    truncate(base / "model.safetensors", keep=-100)
    with pytest.raises(CorruptFileError, match=f"{esc(base / 'model.safetensors')}: not a "):
        load_quantized(base, QuantConfig())
    with pytest.raises(CorruptFileError, match=f"{esc(base / 'model.safetensors')}: not a "):
        read_index(base)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_adapter_tensor_is_refused_by_name(tmp_path, value):
    from loratune.export.merge import read_adapters

    folder = adapter(tmp_path / "ad")
    tensors = load_file(str(folder / WEIGHTS))
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors[key][3, 1] = value
    save_file(tensors, str(folder / WEIGHTS))
    model = llama(2)
    with pytest.raises(CorruptFileError, match=rf"{esc(folder / WEIGHTS)}: tensor {key} holds "
                                               r"NaN or Inf \(1 of 32 values\)"):
        load_adapter(model, folder)
    assert not any("lora" in n for n, _ in model.named_parameters())  # nothing half-loaded
    with pytest.raises(CorruptFileError, match=f"tensor {key} holds NaN or Inf"):
        read_adapters([folder], None)


# --- resume from a corrupt checkpoint ------------------------------------------------------------

def _run_config(tmp_path, tiny_folder, rows=None) -> Path:
    rows = rows or [{"instruction": f"say {w}", "output": w} for w in "abcdefgh"]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "run"), "model": {"name": str(tiny_folder)},
        "adapter": {"r": 2, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": str(data), "max_length": 48},
        "train": {"max_steps": 5, "batch_size": 2, "save_every": 2, "lr": 1e-3}}))
    return path


def _interrupted_run(tmp_path, tiny_folder, capsys, rows=None) -> tuple[Path, Path]:
    """A finished 5-step run made to look as if it died after its step-4 checkpoint."""
    config = _run_config(tmp_path, tiny_folder, rows)
    assert main(["train", str(config)]) == 0
    capsys.readouterr()
    run = tmp_path / "run"
    (run / "run_summary.json").unlink()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step-00000002", "step-00000004"]
    return config, run


def test_resume_refuses_a_corrupt_checkpoint_and_offers_the_previous(tmp_path, tiny_folder,
                                                                      capsys):
    config, run = _interrupted_run(tmp_path, tiny_folder, capsys)
    bad = truncate(run / "checkpoints" / "step-00000004" / "adapter" / WEIGHTS)
    assert main(["train", str(config), "--resume"]) == 2
    one_line_error(capsys, "train", "checkpoint step-00000004 is corrupt", str(bad),
                   "the newest readable one is step-00000002",
                   "pass --resume-skip-corrupt to resume from it")
    assert main(["train", str(config), "--resume-skip-corrupt"]) == 0
    out = capsys.readouterr().out
    assert f"skipping corrupt checkpoint step-00000004: {bad}" in out
    assert f"resumed from {run / 'checkpoints' / 'step-00000002'} at step 2" in out
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(l)]
    assert steps == [1, 2, 3, 4, 5]
    # Step 4 was trained again and its checkpoint rewritten whole.
    load_adapter(tiny_llama(vocab=49152), run / "checkpoints" / "step-00000004" / "adapter")


def test_resume_names_a_broken_trainer_state(tmp_path, tiny_folder, capsys):
    config, run = _interrupted_run(tmp_path, tiny_folder, capsys)
    state = run / "checkpoints" / "step-00000004" / "trainer_state.json"
    state.write_text(state.read_text()[:40])
    assert main(["train", str(config), "--resume"]) == 2
    one_line_error(capsys, "train", f"{state}: not valid JSON", "step-00000002")
    state.write_text(json.dumps({"step": 4}))
    assert main(["train", str(config), "--resume"]) == 2
    one_line_error(capsys, "train", f"{state}: expected a JSON object with an integer 'step'")
    # Every checkpoint damaged: nothing to offer.
    truncate(run / "checkpoints" / "step-00000002" / "trainer_state.safetensors")
    assert main(["train", str(config), "--resume-skip-corrupt"]) == 2
    one_line_error(capsys, "train", "no earlier checkpoint is readable")


# --- messages -----------------------------------------------------------------------------------

def test_directory_as_data_file_says_so(tmp_path, capsys):
    with pytest.raises(DataError, match=rf"^{esc(tmp_path)} is a directory; expected a data file "
                                        r"\(\.jsonl, \.json, \.csv, \.parquet\)$"):
        read_records(tmp_path)


@pytest.mark.parametrize("name, text", [
    ("d.csv", "instruction,output\nsay hi,hi\ncaf\xe9,ok\n"),
    ("d.jsonl", '{"instruction": "hi", "output": "hi"}\n{"instruction": "caf\xe9"}\n'),
    ("d.json", '[{"instruction": "hi", "output": "hi"},\n {"instruction": "caf\xe9"}]'),
], ids=["csv", "jsonl", "json"])
@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"], ids=["plain", "bom"])
def test_non_utf8_file_names_file_line_and_byte(tmp_path, name, text, bom):
    path = tmp_path / name
    data = bom + text.encode("latin-1")
    path.write_bytes(data)
    offset, line = data.index(b"\xe9"), 3 if name == "d.csv" else 2
    with pytest.raises(DataError, match=rf"^{esc(path)}:{line}: byte 0xe9 at offset {offset} is "
                                        r"not UTF-8; expected UTF-8 text"):
        read_records(path)


def test_csv_keeps_windows_line_breaks_inside_cells(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b'instruction,output\r\n"two\r\nlines",ok\r\n')
    assert read_records(path) == [{"instruction": "two\r\nlines", "output": "ok"}]


def test_dropped_count_says_why(tmp_path, smol_tokenizer):
    rows = [{"instruction": "hi", "output": "ok"},
            {"instruction": "word " * 100, "output": "ok"},  # the answer is past max_length
            {"instruction": "word " * 100, "output": "ok"}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, stats = build_examples(path, smol_tokenizer, DataConfig(max_length=64))
    assert stats.dropped() == ("2 dropped (2 with no answer tokens left after truncation to "
                               "data.max_length=64)")
    _, stats = build_examples(path, smol_tokenizer, DataConfig(max_length=64, overflow="drop"))
    assert stats.dropped() == "2 dropped (2 longer than data.max_length=64 (data.overflow: drop))"
    path.write_text(json.dumps(rows[1]) + "\n")
    with pytest.raises(DataError, match=r"all 1 records were dropped \(1 with no answer tokens "
                                        r"left after truncation to data.max_length=64\)"):
        build_examples(path, smol_tokenizer, DataConfig(max_length=64))


def test_training_log_says_why_examples_were_dropped(tmp_path, tiny_folder, capsys):
    rows = [{"instruction": f"say {w}", "output": w} for w in "abcdefgh"]
    rows.append({"instruction": "word " * 100, "output": "ok"})
    config = _run_config(tmp_path, tiny_folder, rows)
    assert main(["train", str(config), "train.save_every=1000"]) == 0
    assert ("1 dropped (1 with no answer tokens left after truncation to data.max_length=48)"
            in capsys.readouterr().out)


@pytest.mark.parametrize("stray", ["training_args.safetensors", WEIGHTS])
def test_pickle_weights_beside_an_unrelated_safetensors_get_the_pickle_message(tmp_path, stray):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    save_file({"x": torch.zeros(2)}, str(tmp_path / stray))
    with pytest.raises(ModelNotFound, match=r"no model\*\.safetensors weights \(found "
                                            r"pytorch_model\.bin: pickle files are refused\)"):
        resolve_model(str(tmp_path))
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(ModelNotFound, match=rf"\({stray} are not model weights\)"):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize("trained_on, loaded_on", [(4, 2), (2, 4)])
def test_adapter_for_another_base_is_hinted(tmp_path, trained_on, loaded_on):
    from loratune.serve.pool import read_lora
    from loratune.serve.types import BadAdapter

    folder = adapter(tmp_path / "ad", layers=trained_on)
    with pytest.raises(AdapterError, match=r"adapter for another base model\?"):
        load_adapter(llama(loaded_on), folder)
    if trained_on > loaded_on:  # the server and merge take a partial adapter as it is
        with pytest.raises(BadAdapter, match=r"adapter for another base model\?"):
            read_lora("ad", folder, llama(loaded_on))


def test_chat_hints_adapter_for_another_base(tmp_path, smol_tokenizer, capsys):
    base = tmp_path / "base4"
    llama(4, vocab=len(smol_tokenizer)).save_pretrained(base)
    smol_tokenizer.save_pretrained(base)
    folder = adapter(tmp_path / "ad", layers=2, vocab=len(smol_tokenizer))
    assert main(["chat", "--model", str(base), "--adapter", str(folder), "--prompt", "hi"]) == 2
    one_line_error(capsys, "chat", str(folder), "adapter for another base model?")
