"""A tokenizer without a chat template (a base model's, e.g. gemma3-270m) gets its family's
documented format, or plain-text alpaca, with a one-line note; never an error after the load."""

import copy
import json

import pytest

from families import FAMILY_SPECS, build_family, family_conversation
from loratune.config import DataConfig
from loratune.data import IGNORE, TEMPLATES, build_examples, resolve_template
from loratune.data.conversation import render
from loratune.data.templates import default_template, template_note


def bare(name: str):
    """The family's tiny tokenizer as a base checkpoint ships it: no chat template."""
    tok = copy.deepcopy(build_family(name)[1])
    tok.chat_template = None
    return tok


@pytest.mark.parametrize("system", [True, False], ids=["system", "no_system"])
def test_gemma_template_renders_as_gemma3s_published_one(system):
    """Our text-only 'gemma' template writes what Gemma 3's own template writes, system
    message (folded into the first user turn) and generation prompt included."""
    tok = build_family("gemma3")[1]
    conv = family_conversation(system=system)
    for prompt in (False, True):
        assert render(tok, conv, TEMPLATES["gemma"], prompt) == render(tok, conv, None, prompt)


@pytest.mark.parametrize("family", ["gemma3", "gemma2"])
def test_gemma_base_tokenizer_gets_gemmas_turn_format(family, tmp_path):
    """The tiny Gemma tokenizer without a template: no DataError; the answer and the
    <end_of_turn> after it are labelled; the data line's note says which format was chosen."""
    tok = bare(family)
    assert default_template(tok)[0] == "gemma"
    assert resolve_template(tok, None) == TEMPLATES["gemma"]
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "Repeat the word apple.",
                                "output": "apple apple apple"}) + "\n")
    examples, stats = build_examples(data, tok, DataConfig(max_length=128))
    ex = examples[0]
    text = tok.decode(ex.input_ids)
    assert "<start_of_turn>user\nRepeat the word apple.<end_of_turn>\n<start_of_turn>model\n" in text
    taught = tok.decode([t for t, label in zip(ex.input_ids, ex.labels) if label != IGNORE])
    assert taught.startswith("apple apple apple<end_of_turn>")
    assert stats.noted().startswith("; note: the tokenizer has no chat template: using Gemma's "
                                    "turn format <start_of_turn>user ... <end_of_turn> "
                                    "(data.template: gemma;")


def test_tokenizer_without_family_format_gets_alpaca_with_a_note():
    tok = bare("qwen2_5")  # no <start_of_turn> in its vocabulary
    name, note = default_template(tok)
    assert name == "alpaca" and resolve_template(tok, None) == TEMPLATES["alpaca"]
    assert "plain-text alpaca" in note and "set data.template to one of" in note


def test_no_note_when_the_template_is_the_tokenizers_or_named():
    assert template_note(build_family("gemma3")[1], None) is None
    assert template_note(bare("gemma3"), "alpaca") is None
    assert FAMILY_SPECS["gemma3"].end_of_turn == "<end_of_turn>"


def test_generation_prompts_use_the_same_default():
    """chat/generate/eval render a template-less tokenizer's prompts as training did."""
    from loratune.eval.generate import prompt_ids

    tok = bare("gemma3")
    msgs = [{"role": "user", "content": "Repeat the word apple."}]
    expected = render(tok, msgs, TEMPLATES["gemma"], True)
    assert tok.decode(prompt_ids(tok, msgs)) == expected
