"""llama.cpp's adapter GGUF: written for the methods whose record gives GGUF factors, read
through the one reader that checks the config against the tensors."""

import dataclasses
import json

import pytest

from loratune.adapters import add_adapter, registry, save_adapter
from loratune.adapters.peft_format import AdapterMismatch
from loratune.adapters.registry import ExportSpec
from loratune.config import LoraConfig
from loratune.export.gguf_file import GGUFExportError, write_lora_gguf
from tiny import randomize_lora, tiny_llama


@pytest.fixture
def folders(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "base")
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_lora(model)
    return save_adapter(model, tmp_path / "ad"), tmp_path / "base"


def test_a_method_without_gguf_factors_is_refused_with_its_reason(folders, tmp_path, monkeypatch):
    adapter, base = folders
    assert write_lora_gguf(adapter, base, tmp_path / "a.gguf").is_file()
    record = registry.method_record("lora")
    monkeypatch.setitem(registry._RECORDS, "lora",
                        dataclasses.replace(record, export=ExportSpec(why_not="no such tensors")))
    with pytest.raises(GGUFExportError, match=r"a lora adapter cannot be written as llama.cpp's "
                                              r"adapter file \(no such tensors\); merge it"):
        write_lora_gguf(adapter, base, tmp_path / "b.gguf")


def test_a_config_whose_rank_the_tensors_contradict_is_refused(folders, tmp_path):
    adapter, base = folders
    config = adapter / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "r": 8}))
    with pytest.raises(AdapterMismatch, match="adapter_model.safetensors"):
        write_lora_gguf(adapter, base, tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()
