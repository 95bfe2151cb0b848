"""GGUF export keeps the chat template whole, tool parts included: llama.cpp (`--jinja`)
renders tools from `tokenizer.chat_template`, and a model's separate tool-use template
(transformers' additional_chat_templates/tool_use.jinja) as `tokenizer.chat_template.tool_use`."""

from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf")

from loratune.export.gguf_file import write_gguf  # noqa: E402
from tiny import tiny_llama  # noqa: E402

TEMPLATES = Path(__file__).parents[1] / "fixtures" / "templates"


def exported(tmp_path, tokenizer, template) -> dict:
    folder = tmp_path / "m"
    tiny_llama(vocab=len(tokenizer)).save_pretrained(folder)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(folder)
    reader = gguf.GGUFReader(str(write_gguf(folder, tmp_path / "m.gguf", "f32",
                                            tokenizer_pre="smollm")))
    return {k: f.contents() for k, f in reader.fields.items() if "chat_template" in k}


@pytest.mark.parametrize("family", ["qwen2_5", "llama3_1", "llama3_2", "mistral_v0_3",
                                    "phi4_mini"])
def test_the_full_template_with_its_tool_parts_is_written(tmp_path, family):
    from loratune.models import load_tokenizer

    template = (TEMPLATES / f"{family}.jinja").read_text()
    fields = exported(tmp_path, load_tokenizer("smollm2-135m-instruct"), template)
    assert fields["tokenizer.chat_template"] == template and "tools" in template


def test_a_separate_tool_use_template_is_written_under_its_name(tmp_path):
    from loratune.models import load_tokenizer

    tool_use = (TEMPLATES / "qwen2_5.jinja").read_text()
    fields = exported(tmp_path, load_tokenizer("smollm2-135m-instruct"),
                      {"default": "{{ messages[0]['content'] }}", "tool_use": tool_use})
    assert fields["tokenizer.chat_template"] == "{{ messages[0]['content'] }}"
    assert fields["tokenizer.chat_template.tool_use"] == tool_use


@pytest.mark.parametrize("where", ["chat_template.jinja", "additional_chat_templates/tool_use.jinja"])
def test_a_template_linked_out_of_the_folder_is_not_written_into_the_gguf(tmp_path, where):
    """A downloaded folder whose template is a link to a file outside it (a key, /etc/...) would
    put that file into a GGUF the user then shares: refused, naming the link."""
    from loratune.data.errors import DataError
    from loratune.export.gguf_tokenizer import _named_templates, folder_template

    secret = tmp_path / "secret.txt"
    secret.write_text("API_KEY=hunter2")
    folder = tmp_path / "model"
    (folder / where).parent.mkdir(parents=True)
    (folder / where).symlink_to(secret)
    with pytest.raises(DataError, match="link out of the adapter folder"):
        folder_template(folder, {}) if where == "chat_template.jinja" else _named_templates(folder)
