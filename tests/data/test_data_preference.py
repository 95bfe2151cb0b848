"""Preference records: the formats, their errors, answer-only spans and prompt-first cuts."""

import json

import pytest

from loratune.config import DataConfig
from loratune.data import DataError
from loratune.data.preference_pairs import (build_preference_examples, collate_pairs,
                                            collate_unpaired, fit_length, preference_batches)
from tiny import chat_template


def _write(tmp_path, rows, name="prefs.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _pairs(path, tok, **data):
    return build_preference_examples(path, tok, DataConfig(**{"max_length": 128, **data}),
                                     "pairs")


def test_three_pair_formats_give_the_same_tokens(tmp_path, smol_tokenizer):
    user = {"role": "user", "content": "Name a colour"}
    red, cat = {"role": "assistant", "content": "red"}, {"role": "assistant", "content": "cat"}
    rows = [{"prompt": "Name a colour", "chosen": "red", "rejected": "cat"},
            {"prompt": [user], "chosen": [red], "rejected": [cat]},
            {"messages": [user], "chosen": "red", "rejected": "cat"},
            {"chosen": [user, red], "rejected": [user, cat]}]
    examples, stats = _pairs(_write(tmp_path, rows), smol_tokenizer)
    assert stats.n_examples == 4 and stats.format == "pairs"
    first = examples[0]
    for ex in examples[1:]:
        assert (ex.prompt, ex.chosen, ex.rejected) == (first.prompt, first.chosen, first.rejected)
    tok = smol_tokenizer
    # the prompt ends with the assistant header; the answer runs through its end marker
    assert tok.decode(first.prompt).endswith("<|im_start|>assistant\n")
    assert tok.decode(first.chosen) == "red<|im_end|>"
    assert tok.decode(first.rejected) == "cat<|im_end|>"


def test_only_the_last_answer_is_scored(tmp_path, smol_tokenizer):
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
               {"role": "user", "content": "colour?"}]
    examples, _ = _pairs(_write(tmp_path, [{"prompt": history, "chosen": "red",
                                            "rejected": "blue"}]), smol_tokenizer)
    assert "hello" in smol_tokenizer.decode(examples[0].prompt)
    assert smol_tokenizer.decode(examples[0].chosen) == "red<|im_end|>"


@pytest.mark.parametrize("row,message", [
    ({"prompt": "q", "chosen": "a"}, "prefs.jsonl:1: missing field 'rejected'"),
    ({"prompt": "q", "rejected": "a"}, "prefs.jsonl:1: missing field 'chosen'"),
    ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "field 'chosen' is empty (an empty "
                                                       "completion)"),
    ({"prompt": "q", "chosen": [{"role": "assistant", "content": ""}], "rejected": "b"},
     "field 'chosen' has an empty assistant answer"),
    ({"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "b"}]},
     "'chosen' and 'rejected' have different prompts"),
    ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
     "field 'chosen' must end with an assistant message"),
    ({"prompt": "q", "completion": "a", "label": True}, "a pairwise objective needs"),
    ({"instruction": "q", "output": "a"}, "not a preference record"),
])
def test_bad_pairs_are_named(tmp_path, smol_tokenizer, row, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _pairs(_write(tmp_path, [row]), smol_tokenizer)


def test_prompts_that_render_differently_are_refused(tmp_path, smol_tokenizer):
    """A template without a separator before the answer: ':' + '(' merge into one token, so
    the tokens before '(red)' are not the tokens before 'blue'."""
    template = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ 'Q: ' + m['content'] + "
                "'\\n' }}{% else %}{{ 'A:' + m['content'] + '\\n' }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}{{ 'A:' }}{% endif %}")
    with chat_template(smol_tokenizer, template) as tok, \
            pytest.raises(DataError, match="prefs.jsonl:1: .*renders differently"):
        _pairs(_write(tmp_path, [{"prompt": "q", "chosen": "(red)", "rejected": "blue"}]), tok)


def test_a_template_that_cannot_locate_answers_names_the_record(tmp_path, smol_tokenizer):
    template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '>' }}{% endif %}")
    with chat_template(smol_tokenizer, template) as tok, \
            pytest.raises(DataError, match="prefs.jsonl:1: the chat template does not render"):
        _pairs(_write(tmp_path, [{"prompt": "q", "chosen": "red", "rejected": "blue"}]), tok)


def test_unpaired_records_and_labels(tmp_path, smol_tokenizer):
    rows = [{"prompt": "q1", "completion": "good", "label": True},
            {"prompt": "q2", "completion": "bad", "label": "false"},
            {"prompt": "q3", "completion": "ok", "label": 1}]
    examples, stats = build_preference_examples(_write(tmp_path, rows), smol_tokenizer,
                                                DataConfig(max_length=64), "unpaired")
    assert [e.desirable for e in examples] == [True, False, True]
    # each KL completion is the previous example's (cyclic): mismatched with its prompt
    assert [e.kl_completion for e in examples] == [examples[i - 1].completion for i in range(3)]
    with pytest.raises(DataError, match="prefs.jsonl:1: field 'label' must be true or false"):
        build_preference_examples(_write(tmp_path, [{"prompt": "q", "completion": "a",
                                                     "label": "maybe"}]),
                                  smol_tokenizer, DataConfig(max_length=64), "unpaired")
    with pytest.raises(DataError, match="missing field 'label'"):
        build_preference_examples(_write(tmp_path, [{"prompt": "q", "completion": "a"}]),
                                  smol_tokenizer, DataConfig(max_length=64), "unpaired")


def test_pairs_feed_kto_as_two_examples(tmp_path, smol_tokenizer):
    examples, _ = build_preference_examples(
        _write(tmp_path, [{"prompt": "q", "chosen": "yes", "rejected": "no"}]),
        smol_tokenizer, DataConfig(max_length=64), "unpaired")
    assert [e.desirable for e in examples] == [True, False]


def test_long_pairs_cut_the_prompt_first_and_are_counted(tmp_path, smol_tokenizer):
    long_prompt = "word " * 200
    rows = [{"prompt": long_prompt, "chosen": "red", "rejected": "blue"},
            {"prompt": "short", "chosen": "red", "rejected": "blue"}]
    examples, stats = _pairs(_write(tmp_path, rows), smol_tokenizer, max_length=40)
    assert stats.n_truncated == 1 and stats.n_examples == 2
    cut = examples[0]
    assert len(cut.prompt) + max(len(cut.chosen), len(cut.rejected)) == 40
    assert smol_tokenizer.decode(cut.chosen) == "red<|im_end|>"  # answers kept whole
    assert smol_tokenizer.decode(cut.prompt).endswith("<|im_start|>assistant\n")
    examples, stats = _pairs(_write(tmp_path, rows), smol_tokenizer, max_length=40,
                             overflow="drop")
    assert stats.n_dropped == 1 and stats.n_examples == 1


def test_fit_length_cuts_answers_only_when_the_prompt_is_one_token():
    prompt, (a, b), cut = fit_length([1, 2, 3], [[4, 5, 6, 7], [8]], 4)
    assert (prompt, a, b, cut) == ([3], [4, 5, 6], [8], True)
    assert fit_length([1], [[2]], 4) == ([1], [[2]], False)


def test_collated_rows(tmp_path, smol_tokenizer):
    examples, _ = _pairs(_write(tmp_path, [{"prompt": "q", "chosen": "red", "rejected": "a b c"},
                                           {"prompt": "qq", "chosen": "x", "rejected": "y"}]),
                         smol_tokenizer)
    batch = collate_pairs(examples, pad_id=0)
    assert batch["input_ids"].shape[0] == 4  # chosen_1, chosen_2, rejected_1, rejected_2
    for row, (ex, side) in enumerate([(examples[0], "chosen"), (examples[1], "chosen"),
                                      (examples[0], "rejected"), (examples[1], "rejected")]):
        labels = [t for t in batch["labels"][row].tolist() if t != -100]
        assert labels == getattr(ex, side)
        n = len(ex.prompt) + len(getattr(ex, side))
        assert batch["attention_mask"][row].sum() == n
    assert "ref_logps" not in batch
    for ex in examples:
        ex.ref = (-1.0, -2.0)
    assert collate_pairs(examples, 0)["ref_logps"].tolist() == [[-1.0, -2.0]] * 2


def test_batches_are_seeded(tmp_path, smol_tokenizer):
    rows = [{"prompt": f"q{i}", "completion": "a", "label": i % 2 == 0} for i in range(6)]
    examples, _ = build_preference_examples(_write(tmp_path, rows), smol_tokenizer,
                                            DataConfig(max_length=64), "unpaired")
    one = preference_batches(examples, 4, 0, seed=1, epoch=0)
    again = preference_batches(examples, 4, 0, seed=1, epoch=0)
    other = preference_batches(examples, 4, 0, seed=1, epoch=1)
    assert [len(b["desirable"]) for b in one] == [4, 2]
    assert all((a["input_ids"] == b["input_ids"]).all() for a, b in zip(one, again))
    assert not all(a["input_ids"].shape == b["input_ids"].shape and
                   (a["input_ids"] == b["input_ids"]).all() for a, b in zip(one, other))
    assert collate_unpaired(examples[:2], 0)["desirable"].tolist() == [True, False]


def test_pairs_with_the_same_answer_are_counted(tmp_path, smol_tokenizer):
    rows = [{"prompt": "q", "chosen": "same", "rejected": "same"},
            {"prompt": "q", "chosen": "yes", "rejected": "no"},
            {"prompt": "q", "chosen": "a b c d e f g h i j", "rejected": "a b c d e f g h i z"}]
    _, stats = _pairs(_write(tmp_path, rows), smol_tokenizer)
    assert (stats.n_pairs, stats.n_identical) == (3, 1)
    # Cut to data.max_length (one prompt token, eight answer tokens) the third pair is the same
    # tokens too: the objective sees no difference.
    _, stats = _pairs(_write(tmp_path, rows), smol_tokenizer, max_length=9)
    assert (stats.n_pairs, stats.n_identical) == (3, 2)
    _, stats = build_preference_examples(_write(tmp_path, rows), smol_tokenizer,
                                         DataConfig(max_length=128), "unpaired")
    assert (stats.n_pairs, stats.n_identical) == (3, 1)
