"""`loratune chat` and `loratune generate` prompt with the template the adapter was trained
with (its chat_template.jinja), as eval and serve do."""

import pytest

from loratune.cli import main
from loratune.eval import generate as generate_module
from tiny import tiny_llama


@pytest.fixture
def folders(tmp_path, smol_tokenizer):
    """(model folder, adapter trained with data.template zephyr, adapter with none)."""
    from loratune.adapters import add_adapter, save_adapter
    from loratune.config import LoraConfig
    from loratune.data.templates import store_template

    model_folder, model = tmp_path / "model", tiny_llama(vocab=len(smol_tokenizer))
    model.save_pretrained(model_folder)
    smol_tokenizer.save_pretrained(model_folder)
    add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"]), "trained")
    zephyr = save_adapter(model, tmp_path / "zephyr", "trained")
    store_template(zephyr, "zephyr")
    return model_folder, zephyr, save_adapter(model, tmp_path / "plain", "trained")


@pytest.fixture
def prompts(monkeypatch):
    """The decoded prompts the commands generate from (answers scripted)."""
    seen = []

    def generate(model, tokenizer, ids, *args, **kwargs):
        seen.extend(tokenizer.decode(p) for p in ids)
        return ["ok"] * len(ids)

    monkeypatch.setattr(generate_module, "generate_from_ids", generate)
    return seen


@pytest.mark.parametrize("command", [["chat", "--prompt", "hi"],
                                     ["generate", "--prompt", "hi", "--prompt", "yo"]])
def test_chat_and_generate_use_the_adapters_stored_template(command, folders, prompts, capsys):
    model, zephyr, _ = folders
    assert main([*command, "--model", str(model), "--adapter", str(zephyr)]) == 0
    words = [w for w in command[1:] if w != "--prompt"]
    # zephyr's layout, closed by SmolLM2's eos
    assert prompts == [f"<|user|>\n{w}<|im_end|>\n<|assistant|>\n" for w in words]
    assert "chat template 'zephyr' from the adapters' chat_template.jinja" in \
        capsys.readouterr().err


def test_without_a_stored_template_the_tokenizers_own(folders, prompts):
    model, _, plain = folders
    assert main(["chat", "--prompt", "hi", "--model", str(model), "--adapter", str(plain)]) == 0
    assert prompts[0].startswith("<|im_start|>"), prompts


def test_adapters_of_different_templates_are_refused_by_name(folders, prompts, capsys):
    model, zephyr, plain = folders
    assert main(["generate", "--prompt", "hi", "--model", str(model), "--adapter", str(zephyr),
                 "--adapter", str(plain)]) == 2
    err = capsys.readouterr().err
    assert "zephyr (chat_template.jinja: 'zephyr') and" in err and "plain (no chat" in err, err
    assert not prompts
