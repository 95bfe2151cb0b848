"""A downloaded adapter's adapter_config.json that is not a JSON object of UTF-8 text is refused
as an AdapterError naming the file (serve's load endpoint: a 422, not a 500), whatever it holds."""

import pytest

from loratune.adapters import AdapterError
from loratune.adapters.peft_format import CONFIG_NAME, read_adapter_config


@pytest.mark.parametrize("content, said", [
    (b'{"peft_type": "LORA"\xff}', r"not UTF-8 text \(byte 20\)"),
    (b"[" * 100_000, "not valid JSON: nested too deeply"),
    (b'["LORA"]', "expected a JSON object, got a list"),
    (b'"LORA"', "expected a JSON object, got a str"),
])
def test_a_config_that_is_no_json_object_is_named(tmp_path, content, said):
    (tmp_path / CONFIG_NAME).write_bytes(content)
    with pytest.raises(AdapterError, match=rf"{CONFIG_NAME}: {said}"):
        read_adapter_config(tmp_path)
