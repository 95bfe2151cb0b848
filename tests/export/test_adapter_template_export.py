"""An adapter's stored chat template (data.template -> adapter/chat_template.jinja) reaches what
merge and export write (issue 27): the merged folder's tokenizer, the GGUF's
tokenizer.chat_template and the Ollama Modelfile, not the base folder's template."""

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from loratune.adapters import add_adapter, save_adapter
from loratune.cli import main
from loratune.config import LoraConfig
from loratune.data.templates import TEMPLATES, DataError, store_template
from loratune.export.merge import merge_folder, read_adapters

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CHAT = [{"role": "user", "content": "Weather in Lima?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
            "name": "get_weather", "arguments": {"city": "Lima"}}}]},
        {"role": "tool", "name": "get_weather", "content": "25 C"}]


@pytest.fixture(scope="module")
def base(tiny_folder, tmp_path_factory):
    """The tiny SmolLM2 folder with its plain chatml template in tokenizer_config.json (as many
    downloads have it) instead of chat_template.jinja."""
    folder = tmp_path_factory.mktemp("old_style") / "base"
    folder.mkdir()
    for item in tiny_folder.iterdir():
        if item.is_file() and item.name != "chat_template.jinja":
            (folder / item.name).write_bytes(item.read_bytes())
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = (tiny_folder / "chat_template.jinja").read_text()
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert "tools" not in cfg["chat_template"]
    return folder


def _adapter(base, folder, template):
    model = AutoModelForCausalLM.from_pretrained(base)
    add_adapter(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    save_adapter(model, folder)
    store_template(folder, template)
    return folder


@pytest.fixture(scope="module")
def tools_adapter(base, tmp_path_factory):
    return _adapter(base, tmp_path_factory.mktemp("ad") / "tools", "chatml_tools")


def test_merged_folder_tokenizer_renders_tools_with_the_adapters_template(base, tools_adapter,
                                                                          tmp_path):
    out = merge_folder(base, read_adapters([tools_adapter], None), tmp_path / "merged").out
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == TEMPLATES["chatml_tools"]
    text = tok.apply_chat_template(CHAT, tools=TOOLS, tokenize=False)
    assert text == tok.apply_chat_template(CHAT, tools=TOOLS, tokenize=False,
                                           chat_template=TEMPLATES["chatml_tools"])
    assert "get_weather" in text.split("<|im_start|>user")[0]  # the tools, in the system turn
    # one template in the folder: the base's is not left in tokenizer_config.json
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())


def test_merge_refuses_adapters_trained_with_different_templates(base, tools_adapter, tmp_path):
    plain = _adapter(base, tmp_path / "plain", "chatml")
    with pytest.raises(DataError, match="different chat templates"):
        merge_folder(base, read_adapters([tools_adapter, plain], None), tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_gguf_and_modelfile_carry_the_adapters_tools_template(base, tools_adapter, tmp_path):
    gguf = pytest.importorskip("gguf")
    out = tmp_path / "m.gguf"
    assert main(["export", "gguf", "--model", str(base), "--adapter", str(tools_adapter),
                 "--out", str(out), "--type", "f16"]) == 0
    fields = gguf.GGUFReader(str(out)).fields
    assert fields["tokenizer.chat_template"].contents() == TEMPLATES["chatml_tools"]
    assert "range .Tools" in (tmp_path / "m.Modelfile").read_text()
    # adapter-only: llama.cpp's adapter file holds no tokenizer, the Modelfile's TEMPLATE does
    assert main(["export", "gguf", "--model", str(base), "--adapter", str(tools_adapter),
                 "--adapter-only", "--out", str(tmp_path / "lora.gguf")]) == 0
    assert not any("chat_template" in k
                   for k in gguf.GGUFReader(str(tmp_path / "lora.gguf")).fields)
    lines = (tmp_path / "lora.Modelfile").read_text().splitlines()
    assert "ADAPTER ./lora.gguf" in lines and any("range .Tools" in x for x in lines)


def _gguf_template(folder, out) -> str:
    gguf = pytest.importorskip("gguf")
    from loratune.export.gguf_file import write_gguf

    path = write_gguf(folder, out, "f32", tokenizer_pre="smollm")
    return gguf.GGUFReader(str(path)).fields["tokenizer.chat_template"].contents()


def _copy(base, folder):
    folder.mkdir()
    for item in base.iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    return folder


def test_gguf_takes_chat_template_jinja_first_as_transformers_does(base, tmp_path):
    folder = _copy(base, tmp_path / "both")  # a stale template left in tokenizer_config.json
    (folder / "chat_template.jinja").write_text(TEMPLATES["chatml_tools"])
    assert AutoTokenizer.from_pretrained(folder).chat_template == TEMPLATES["chatml_tools"]
    assert _gguf_template(folder, tmp_path / "m.gguf") == TEMPLATES["chatml_tools"]


def test_merge_of_a_gguf_base_keeps_the_adapters_template_over_the_source_gguf(base, tmp_path):
    # a folder converted from a GGUF copies that GGUF's tokenizer (its SOURCE note); merged with
    # an adapter, its own chat template is the adapter's and must win over the source's
    source = tmp_path / "source.gguf"
    original = _gguf_template(base, source)
    folder = _copy(base, tmp_path / "merged")
    (folder / "SOURCE").write_text(f"converted from {source}\n")
    assert _gguf_template(folder, tmp_path / "same.gguf") == original
    (folder / "chat_template.jinja").write_text(TEMPLATES["chatml_tools"])
    assert _gguf_template(folder, tmp_path / "m.gguf") == TEMPLATES["chatml_tools"]
