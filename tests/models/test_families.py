"""The family matrix: every family of tests/families.py through load, train, merge, QLoRA,
planner, masking and stopping."""

import json

import pytest
import torch

from families import FAMILIES, FAMILY_SPECS, build_family, family_conversation
from loratune.config import DataConfig
from loratune.data import IGNORE, DataError, build_examples, encode_conversation
from loratune.data.conversation import FOLDED_NOTE, fit_conversation
from loratune.eval.generate import TemplateNote, generate_chat, prompt_ids


@pytest.mark.parametrize("name", FAMILIES)
def test_fixture_is_the_family(name):
    """The tiny model has the family's quirks and the tokenizer its special tokens."""
    model, tok = build_family(name)
    fam = FAMILY_SPECS[name]
    assert model.config.model_type == fam.model_type
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    assert ("qkv_proj" in names and "gate_up_proj" in names) == fam.fused
    assert (model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()) \
        == fam.tie
    for t in fam.specials + fam.generation_eos + (fam.end_of_turn,):
        assert len(tok(t, add_special_tokens=False).input_ids) == 1, t
    assert model.generation_config.eos_token_id == [tok.convert_tokens_to_ids(t)
                                                    for t in fam.generation_eos]
    text = "Hello world, apple 123! é"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    assert torch.isfinite(model(tok(text, return_tensors="pt").input_ids).logits).all()


# -- chat templates and answer masking ------------------------------------------------------------
def expected_labels(tok, fam, text: str, ids: list[int]) -> list[int]:
    """Labels derived from the rendered text alone: each token overlapping [end of an assistant
    header, end of the next end-of-turn token] is labelled, and the final eos; nothing else."""
    spans, at = [], 0
    while (h := text.find(fam.assistant_header, at)) >= 0:
        start = h + len(fam.assistant_header)
        end = text.index(fam.end_of_turn, start) + len(fam.end_of_turn)
        spans.append((start, end))
        at = end
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    labels = [t if any(a < e and max(b, a + 1) > s for s, e in spans) else IGNORE
              for t, (a, b) in zip(ids, offsets)]
    if len(ids) > len(offsets):  # eos appended after the text
        labels.append(tok.eos_token_id)
    elif ids[-1] == tok.eos_token_id:
        labels[-1] = tok.eos_token_id
    return labels


def fit_and_encode(name, messages, think="keep"):
    _, tok = build_family(name)
    cfg = DataConfig(think=think)
    fitted, notes = fit_conversation(messages, tok, tok.chat_template, cfg.think)
    ex, _ = encode_conversation(fitted, tok, tok.chat_template, "answers", 512)
    return tok, fitted, notes, ex


def taught(tok, ex) -> list[str]:
    runs, run = [], []
    for token, label in zip(ex.input_ids, ex.labels):
        if label != IGNORE:
            run.append(token)
        elif run:
            runs.append(tok.decode(run))
            run = []
    return runs + ([tok.decode(run)] if run else [])


@pytest.mark.parametrize("system", [True, False], ids=["system", "no_system"])
@pytest.mark.parametrize("name", FAMILIES)
def test_multi_turn_masking_token_by_token(name, system):
    """Two turns, with and without a system message, on the family's published template: only
    the answers and the end-of-turn token after each are labelled (and the final eos)."""
    fam = FAMILY_SPECS[name]
    conv = family_conversation(system=system)
    tok, fitted, notes, ex = fit_and_encode(name, conv)
    text = tok.apply_chat_template(fitted, tokenize=False)
    rendered = tok(text, add_special_tokens=False).input_ids
    assert ex.input_ids[:len(rendered)] == rendered and len(ex.input_ids) - len(rendered) <= 1
    assert ex.labels == expected_labels(tok, fam, text, ex.input_ids)
    runs = taught(tok, ex)
    for answer in ("Paris is the capital of France.", "apple apple apple"):
        assert sum(answer + fam.end_of_turn in run for run in runs) == 1, runs
    assert not any("France?" in run or "Repeat" in run for run in runs)
    if system:
        assert text.count("You are a helpful assistant. Be brief.") == 1
        # folded (with a note) exactly where the template cannot render a system message
        assert bool(notes) == (not fam.system_role)


def test_gemma2_system_message_is_a_data_error_unfolded_and_folded_with_a_note(tmp_path):
    """Gemma 2's template raises on a system role: encode says so as a DataError; the data
    pipeline folds it into the first user turn and counts the note."""
    _, tok = build_family("gemma2")
    with pytest.raises(DataError, match="the chat template refused the conversation: "
                                        "System role not supported"):
        encode_conversation(family_conversation(True), tok, tok.chat_template, "answers", 512)
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": family_conversation(True)}) + "\n")
    examples, stats = build_examples(path, tok, DataConfig())
    assert stats.notes == {FOLDED_NOTE: 1} and "note: 1 records: system message folded" in \
        stats.noted()
    text = tok.decode(examples[0].input_ids)
    assert "<start_of_turn>user\nYou are a helpful assistant. Be brief.\n\nWhat is the capital" \
        in text


def test_mistral_system_message_is_folded_into_the_first_user_turn():
    tok, fitted, notes, ex = fit_and_encode("mistral_v0_3", family_conversation(True))
    text = tok.decode(ex.input_ids)
    assert text.startswith("<s>[INST] You are a helpful assistant. Be brief.\n\nWhat is the "
                           "capital of France?[/INST] Paris is the capital of France.</s>")
    assert notes == [FOLDED_NOTE]


THINKING = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "<think>\nFrance: Paris.\n</think>\n\nParis."},
    {"role": "user", "content": "Repeat the word apple."},
    {"role": "assistant", "content": "<think>\nThree times.\n</think>\n\napple apple apple"},
]


def test_qwen3_think_blocks_kept_or_stripped_by_option():
    tok, _, _, kept = fit_and_encode("qwen3", THINKING, think="keep")
    # kept: the last answer's reasoning is trained on; Qwen3's template itself drops the
    # reasoning of past answers from the history
    assert taught(tok, kept) == [
        "Paris.<|im_end|>", "<think>\nThree times.\n</think>\n\napple apple apple<|im_end|>"]
    tok, _, _, stripped = fit_and_encode("qwen3", THINKING, think="strip")
    assert taught(tok, stripped) == ["Paris.<|im_end|>",
                                     "<think>\n\n</think>\n\napple apple apple<|im_end|>"]
    assert "Three times" not in tok.decode(stripped.input_ids)
    with pytest.raises(ValueError, match="think"):
        DataConfig(think="drop")


def test_phi3_trailing_eos_is_labelled_and_each_turn_ends_at_end():
    tok, _, _, ex = fit_and_encode("phi3", family_conversation(True))
    text = tok.apply_chat_template(family_conversation(True), tokenize=False)
    assert text.endswith("apple apple apple<|end|>\n<|endoftext|>")
    assert ex.input_ids == tok(text, add_special_tokens=False).input_ids  # nothing appended
    assert taught(tok, ex) == ["Paris is the capital of France.<|end|>",
                               "apple apple apple<|end|>", "<|endoftext|>"]


@pytest.mark.parametrize("name", ["gemma2", "mistral_v0_3"])
def test_inference_prompt_folds_the_system_message_with_a_warning(name):
    _, tok = build_family(name)
    conv = family_conversation(True)[:4]  # system, user, answer, user
    with pytest.warns(TemplateNote, match="system message folded"):
        ids = prompt_ids(tok, conv)
    assert "You are a helpful assistant. Be brief.\n\nWhat is the capital" in tok.decode(ids)


# -- stopping -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_generation_stops_at_every_eos_of_the_generation_config(name):
    """Each id of the family's generation-config eos list ends a reply at once; an id not in
    the list (and not the tokenizer's eos) does not."""
    model, tok = build_family(name)
    calls = []
    forced = {}

    def force(module, args, out):
        calls.append(1)
        out = out.clone()
        out[..., forced["id"]] = 1e4
        return out

    model.get_output_embeddings().register_forward_hook(force)
    conv = [{"role": "user", "content": "Name a colour."}]
    listed = model.generation_config.eos_token_id
    assert len(listed) == len(FAMILY_SPECS[name].generation_eos)
    for eid in listed:
        forced["id"], calls[:] = eid, []
        generate_chat(model, tok, [conv], max_new_tokens=4)
        assert len(calls) == 1, (name, tok.convert_ids_to_tokens(eid))
    model.generation_config.eos_token_id = [e for e in listed if e == tok.eos_token_id]
    for eid in (e for e in listed if e != tok.eos_token_id):
        forced["id"], calls[:] = eid, []
        generate_chat(model, tok, [conv], max_new_tokens=4)
        assert len(calls) == 4
