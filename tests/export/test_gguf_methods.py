"""llama.cpp's adapter GGUF of a method that is not plain LoRA factors: refused with the
method's own reason and the advice to merge first, and nothing is written."""

import pytest

from loratune.adapters import add_adapter, method_record, save_adapter
from loratune.config import IA3Config, LoraConfig
from loratune.export.gguf_file import GGUFExportError, write_lora_gguf
from tiny import tiny_llama


@pytest.mark.parametrize("method, config", [
    ("dora", LoraConfig(r=4, use_dora=True, target_modules=["q_proj", "v_proj"])),
    ("ia3", IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])),
])
def test_a_non_lora_adapter_is_refused_with_its_records_reason(tmp_path, method, config):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "base")
    add_adapter(model, config, "x")
    folder = save_adapter(model, tmp_path / "ad", "x")
    reason = method_record(method).export.why_not
    with pytest.raises(GGUFExportError, match=rf"a {method} adapter cannot be written as "
                                              rf"llama.cpp's adapter file \({reason[:25]}.*merge"):
        write_lora_gguf(folder, tmp_path / "base", tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()
