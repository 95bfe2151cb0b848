"""Chat templates and labels: exactly the answers (with their end marker) carry loss."""

import copy
import json

import pytest

from loratune.config import DataConfig
from loratune.data import (
    IGNORE,
    TEMPLATES,
    DataError,
    build_examples,
    collate,
    encode_conversation,
    resolve_template,
    split_heldout,
)

CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]


@pytest.fixture(scope="module")
def bare_tokenizer(smol_tokenizer):
    """The SmolLM2 tokenizer without its chat template."""
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = None
    return tok


def taught(tok, ex) -> list[str]:
    """The decoded runs of consecutive labelled tokens."""
    runs, run = [], []
    for token, label in zip(ex.input_ids, ex.labels):
        if label != IGNORE:
            assert label == token
            run.append(token)
        elif run:
            runs.append(tok.decode(run))
            run = []
    return runs + ([tok.decode(run)] if run else [])


def render(tok, messages, template=None, prompt=False) -> str:
    return tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                   add_generation_prompt=prompt)


def test_chatml_labels_exactly_the_answers(smol_tokenizer):
    tok = smol_tokenizer
    ex, cut = encode_conversation(CHAT, tok, resolve_template(tok, None), "answers", 512)
    assert not cut
    assert taught(tok, ex) == ["Hello there<|im_end|>", "4<|im_end|>"]
    # Exact boundaries: the unlabelled head is the prompt with its generation prompt, and every
    # token up to the end of each answer's <|im_end|> is labelled.
    first = next(i for i, label in enumerate(ex.labels) if label != IGNORE)
    assert tok.decode(ex.input_ids[:first]) == render(tok, CHAT[:2], prompt=True)
    assert tok.decode(ex.input_ids) == render(tok, CHAT)  # nothing appended: ends with eos
    last = max(i for i, label in enumerate(ex.labels) if label != IGNORE)
    assert tok.decode(ex.input_ids[: last + 1]) == render(tok, CHAT).rstrip()


def test_eos_is_labelled_when_pad_is_eos(smol_tokenizer):
    tok = smol_tokenizer
    assert tok.pad_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    exs = [encode_conversation(m, tok, tok.chat_template, "answers", 512).example
           for m in (CHAT, short)]
    eos_positions = [i for i, t in enumerate(exs[1].input_ids) if t == tok.eos_token_id]
    assert [exs[1].labels[i] for i in eos_positions][-1] == tok.eos_token_id
    batch = collate([[exs[0]], [exs[1]]], tok.pad_token_id, packed=False)
    n = len(exs[1])
    row = batch["labels"][1]
    # Padding has the same id as eos but no label; the answer's eos keeps its label.
    assert batch["input_ids"][1, n:].eq(tok.eos_token_id).all() and row[n:].eq(IGNORE).all()
    assert row[eos_positions[-1]].item() == tok.eos_token_id


def test_eos_appended_when_template_does_not_end_with_it(smol_tokenizer):
    tok = copy.deepcopy(smol_tokenizer)
    tok.eos_token = tok.pad_token = "<|endoftext|>"  # end-of-turn marker != eos
    ex, _ = encode_conversation(CHAT, tok, TEMPLATES["chatml"], "answers", 512)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    assert ex.input_ids[-1] == eos and ex.labels[-1] == eos
    assert taught(tok, ex) == ["Hello there<|im_end|>", "4<|im_end|>", "<|endoftext|>"]
    assert tok.decode(ex.input_ids) == render(tok, CHAT, TEMPLATES["chatml"]) + "<|endoftext|>"


def test_train_on_all_labels_every_token(smol_tokenizer):
    ex, _ = encode_conversation(CHAT, smol_tokenizer, smol_tokenizer.chat_template, "all", 512)
    assert ex.labels == ex.input_ids
    assert smol_tokenizer.decode(ex.input_ids) == render(smol_tokenizer, CHAT)


def test_resolve_template_errors(smol_tokenizer, bare_tokenizer):
    assert resolve_template(smol_tokenizer, None) == smol_tokenizer.chat_template
    assert resolve_template(smol_tokenizer, "zephyr") == TEMPLATES["zephyr"]
    # no template and no family format in the vocabulary: plain-text alpaca (test_templates.py)
    assert resolve_template(bare_tokenizer, None) == TEMPLATES["alpaca"]
    with pytest.raises(DataError, match=r"unknown chat template 'vicuna' \(data.template\); "
                                        "known: chatml, llama2, alpaca, zephyr, gemma"):
        resolve_template(bare_tokenizer, "vicuna")


@pytest.mark.parametrize("name,text,answers", [
    ("chatml", "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
               "<|im_start|>assistant\nHello there<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
               "<|im_start|>assistant\n4<|im_end|>\n",
     ["Hello there<|im_end|>", "4<|im_end|>"]),
    ("llama2", "<|im_start|>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello there "
               "<|im_end|><|im_start|>[INST] 2+2? [/INST] 4 <|im_end|>",
     [" Hello there <|im_end|>", " 4 <|im_end|>"]),
    ("alpaca", "Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello there<|im_end|>\n\n"
               "### Instruction:\n2+2?\n\n### Response:\n4<|im_end|>\n\n",
     ["Hello there<|im_end|>", "4<|im_end|>"]),
    ("zephyr", "<|system|>\nBe brief.<|im_end|>\n<|user|>\nHi<|im_end|>\n<|assistant|>\n"
               "Hello there<|im_end|>\n<|user|>\n2+2?<|im_end|>\n<|assistant|>\n4<|im_end|>\n",
     ["Hello there<|im_end|>", "4<|im_end|>"]),
])
def test_named_templates_for_tokenizer_without_one(bare_tokenizer, name, text, answers):
    # bos of this tokenizer is <|im_start|>, eos is <|im_end|>
    template = resolve_template(bare_tokenizer, name)
    ex, _ = encode_conversation(CHAT, bare_tokenizer, template, "answers", 512)
    assert bare_tokenizer.decode(ex.input_ids) == text
    assert taught(bare_tokenizer, ex) == answers


def test_token_across_the_answer_boundary_is_taught(smol_tokenizer):
    # The generation prompt ends with a space, which BPE merges into the answer's first
    # token (" Hello"); that token must still carry a label.
    template = ("{% for m in messages %}{{ ('User: ' if m['role'] == 'user' else 'Assistant: ')"
                " + m['content'] + '\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}")
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello world"}]
    ex, _ = encode_conversation(msgs, smol_tokenizer, template, "answers", 64)
    # No end marker in this template, so eos is appended (after the unlabelled newline).
    assert taught(smol_tokenizer, ex) == [" Hello world", "<|im_end|>"]


def test_template_that_rewrites_history_is_refused(smol_tokenizer):
    # Renders only the last turn with a marker: earlier prefixes are not prefixes of the whole.
    template = ("{% for m in messages %}{{ m['content'] }}{% if loop.last %}{{ '!' }}{% endif %}"
                "{% endfor %}")
    with pytest.raises(DataError, match=r"does not render conversations prefix by prefix "
                                        r"\(assistant turn 1: its prompt is not the start of the "
                                        r"whole conversation\).*train_on: all"):
        encode_conversation(CHAT[1:], smol_tokenizer, template, "answers", 64)
    ex, _ = encode_conversation(CHAT[1:], smol_tokenizer, template, "all", 64)
    assert smol_tokenizer.decode(ex.input_ids) == "HiHello there2+2?4!<|im_end|>"


def test_leading_assistant_turn_is_context(smol_tokenizer):
    msgs = [{"role": "assistant", "content": "Welcome!"}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Yo"}]
    ex, _ = encode_conversation(msgs, smol_tokenizer, smol_tokenizer.chat_template, "answers", 99)
    assert taught(smol_tokenizer, ex) == ["Yo<|im_end|>"]


def test_truncate_or_drop(smol_tokenizer):
    tok = smol_tokenizer
    msgs = [{"role": "user", "content": "Count"},
            {"role": "assistant", "content": " ".join(str(i) for i in range(100))}]
    full, cut = encode_conversation(msgs, tok, tok.chat_template, "answers", 10_000)
    assert not cut and len(full) > 64
    ex, cut = encode_conversation(msgs, tok, tok.chat_template, "answers", 64)
    assert cut and ex.input_ids == full.input_ids[:64] and ex.labels == full.labels[:64]
    assert encode_conversation(msgs, tok, tok.chat_template, "answers", 64, "drop") == (None, True)
    n_prompt = full.labels.index(next(label for label in full.labels if label != IGNORE))
    # Cut right after the first answer token: one label is left, the example is kept.
    assert encode_conversation(msgs, tok, tok.chat_template, "answers", n_prompt + 1).example
    # Cut inside the prompt: nothing to learn, dropped (reported as truncated).
    assert encode_conversation(msgs, tok, tok.chat_template, "answers", n_prompt) == (None, True)
    with pytest.raises(DataError, match="data.train_on is 'prompt'; expected one of answers, all"):
        encode_conversation(msgs, tok, tok.chat_template, "prompt", 64)


def test_build_examples_counts(tmp_path, smol_tokenizer):
    tok = smol_tokenizer
    rows = [{"instruction": "hi", "output": "ok"},
            {"instruction": "hi", "output": "word " * 100},  # cut to max_length
            {"instruction": "word " * 100, "output": "ok"},  # the answer is past max_length
            {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, stats = build_examples(path, tok, DataConfig(max_length=64))
    assert (stats.n_records, stats.n_examples, stats.n_truncated, stats.n_dropped) == (4, 3, 1, 1)
    assert stats.format == "mixed: alpaca, sharegpt"
    assert [len(e) for e in examples][1] == 64
    assert stats.n_tokens == sum(len(e) for e in examples)
    assert stats.n_label_tokens == sum(label != IGNORE for e in examples for label in e.labels[1:])
    assert [taught(tok, examples[i]) for i in (0, 2)] == [["ok<|im_end|>"], ["a<|im_end|>"]]
    _, stats = build_examples(path, tok, DataConfig(max_length=64, overflow="drop"))
    assert (stats.n_examples, stats.n_truncated, stats.n_dropped) == (2, 0, 2)
    path.write_text(json.dumps(rows[2]) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl: no usable examples: all 1 records were "):
        build_examples(path, tok, DataConfig(max_length=32))
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    # no template and no family turn tokens: alpaca, said once in the data line's notes
    default, stats = build_examples(tmp_path / "d.jsonl", bare, DataConfig())
    assert bare.decode(default[0].input_ids).startswith("### Instruction:\n")
    assert "no chat template: using plain-text alpaca" in stats.noted()
    examples, _ = build_examples(tmp_path / "d.jsonl", bare, DataConfig(template="alpaca"))
    assert bare.decode(examples[0].input_ids).startswith("### Instruction:\n")


def test_split_heldout_is_deterministic():
    items = list(range(20))
    train, held = split_heldout(items, 0.25, seed=3)
    assert len(held) == 5 and sorted(train + held) == items
    assert train == sorted(train) and held == sorted(held)  # input order kept
    assert split_heldout(items, 0.25, seed=3) == (train, held)
    assert split_heldout(items, 0.25, seed=4) != (train, held)
    assert split_heldout(items, 0.0, seed=3) == (items, [])
    assert len(split_heldout(items, 0.01, seed=3)[1]) == 1
    with pytest.raises(DataError, match="eval_fraction=0.5 of 1 examples leaves none to train on"):
        split_heldout([1], 0.5, seed=0)


def test_template_error_names_the_record(tmp_path, smol_tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n')
    bad = "{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}{% endfor %}"
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = bad
    with pytest.raises(DataError, match=r"^.*d\.jsonl:1: the chat template does not render "):
        build_examples(path, tok, DataConfig())
