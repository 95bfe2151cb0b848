"""Tool-use conversations: read (OpenAI and ShareGPT layouts), checked, rendered by each
family's own template, and labelled on the assistant's turns only (calls included)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from families import FAMILY_SPECS, family_tokenizer, labels_over_spans, taught  # noqa: E402

from loratune.config import DataConfig  # noqa: E402
from loratune.data import DataError, build_examples  # noqa: E402
from loratune.data.tools import tool_conversation  # noqa: E402

TOOL_FAMILIES = ["llama3_1", "llama3_2", "qwen2_5", "qwen3", "mistral_v0_3", "phi4_mini"]
NO_TOOLS = ["gemma2", "gemma3", "phi3", "phi3_5"]
# Where an answer that follows tool results starts, beyond the family's assistant header.
AFTER_RESULTS = {"mistral_v0_3": "[/TOOL_RESULTS]"}

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
RESULT = "cloud 42 stone"


def openai_record(**over) -> dict:
    record = {"tools": [WEATHER], "messages": [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": RESULT},
        {"role": "assistant", "content": "apple apple apple"},
    ]}
    record.update(over)
    return record


def sharegpt_record() -> dict:
    return {"tools": json.dumps([WEATHER["function"]]), "conversations": [
        {"from": "human", "value": "What is the capital of France?"},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": '
                                           '"Paris"}}'},
        {"from": "observation", "value": RESULT},
        {"from": "gpt", "value": "apple apple apple"},
    ]}


def write(tmp_path, *records) -> Path:
    path = tmp_path / "tools.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def expected_labels(tok, name, text, ids, at=0):
    """Labels from the rendered text alone: from each assistant header (or the end of tool
    results, for Mistral) after character `at` through the next end-of-turn token, and the
    final eos."""
    fam = FAMILY_SPECS[name]
    heads = [fam.assistant_header] + ([AFTER_RESULTS[name]] if name in AFTER_RESULTS else [])
    spans = []
    while True:
        found = [(h, text.find(h, at)) for h in heads if text.find(h, at) >= 0]
        if not found:
            break
        head, h = min(found, key=lambda x: x[1])
        start = h + len(head)
        end = text.index(fam.end_of_turn, start) + len(fam.end_of_turn)
        spans.append((start, end))
        at = end
    return labels_over_spans(tok, text, ids, spans)


@pytest.mark.parametrize("layout", ["openai", "sharegpt"])
@pytest.mark.parametrize("name", TOOL_FAMILIES)
def test_tool_call_masking_token_by_token(name, layout, tmp_path):
    """The call and the final answer carry loss (with their end-of-turn token); the question
    and the tool's result never do; the template renders the declared tool."""
    tok = family_tokenizer(name)
    record = openai_record() if layout == "openai" else sharegpt_record()
    (ex,), stats = build_examples(write(tmp_path, record), tok, DataConfig(max_length=1024))
    text = tok.decode(ex.input_ids, skip_special_tokens=False)
    rendered = tok(text, add_special_tokens=False).input_ids
    assert ex.input_ids[:len(rendered)] == rendered
    assert ex.labels == expected_labels(tok, name, text, ex.input_ids)
    runs = taught(tok, ex)
    assert "get_weather" in text.split("What is the capital")[0] or name == "mistral_v0_3"
    assert len(runs) == 2, runs
    assert "get_weather" in runs[0] and '"Paris"' in runs[0], runs
    assert "apple apple apple" + FAMILY_SPECS[name].end_of_turn in runs[1], runs
    assert not any(RESULT in r or "France?" in r for r in runs), runs


def _second_turn() -> list[dict]:
    return [{"role": "user", "content": "And in Rome?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c2", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
            {"role": "tool", "tool_call_id": "c2", "content": "sun 7 stone"},
            {"role": "assistant", "content": "pear pear"}]


def test_mistral_several_user_turns_with_tools_become_one_example_per_turn(tmp_path):
    """Mistral v0.3 declares [AVAILABLE_TOOLS] before the last user turn only: each user turn
    is its own example, rendered as a conversation ending there (tools right before that
    turn), taught on that turn's replies only; a note says how many examples it became."""
    tok = family_tokenizer("mistral_v0_3")
    record = openai_record()
    record["messages"] = [{"role": "system", "content": "Be brief."}] + record["messages"] + \
        _second_turn()
    (one, two), stats = build_examples(write(tmp_path, record), tok, DataConfig(max_length=1024))
    assert stats.n_records == 1 and stats.n_examples == 2
    assert "split into 2 examples, one per user turn" in stats.noted(), stats.noted()
    runs = []
    for ex, question in ((one, "What is"), (two, "And in")):
        text = tok.decode(ex.input_ids, skip_special_tokens=False)
        # the tools once, right before the example's own (last) user turn
        assert text.count("[AVAILABLE_TOOLS]") == 1, text
        assert text.index("[/AVAILABLE_TOOLS]") + len("[/AVAILABLE_TOOLS]") == \
            text.rindex("[INST]") < text.index(question), text
        asked = text.index(question)
        assert ex.labels == expected_labels(tok, "mistral_v0_3", text, ex.input_ids, asked)
        runs.append(taught(tok, ex))
    assert len(runs[0]) == 2 and '"Paris"' in runs[0][0] and runs[0][1] == "apple apple apple</s>"
    assert len(runs[1]) == 2 and '"Rome"' in runs[1][0] and runs[1][1] == "pear pear</s>", runs
    assert not any("stone" in r or "apple" in r for r in runs[1]), runs
    two_text = tok.decode(two.input_ids, skip_special_tokens=False)
    # the second example holds the first turn as context (the system prompt folded into it)
    assert two_text.startswith("<s>[INST] Be brief.\n\nWhat is the capital of France?[/INST]"
                               "[TOOL_CALLS]"), two_text


def test_one_user_turn_or_a_prefix_template_stays_one_example(tmp_path):
    """Only a template that moves the tools needs the split: Qwen2.5 keeps both turns in one
    example, taught on every reply."""
    record = openai_record()
    record["messages"] += _second_turn()
    (ex,), stats = build_examples(write(tmp_path, record), family_tokenizer("qwen2_5"),
                                  DataConfig(max_length=1024))
    assert len(taught(family_tokenizer("qwen2_5"), ex)) == 4 and "split" not in stats.noted()


def test_openai_and_sharegpt_layouts_read_the_same():
    a = tool_conversation(openai_record(), "messages", "f.jsonl:1")
    b = tool_conversation(sharegpt_record(), "sharegpt", "f.jsonl:1")
    assert a == b
    messages, tools = a
    assert tools == [WEATHER]
    assert messages[1]["tool_calls"] == [{"id": "call00001", "type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert messages[2] == {"role": "tool", "tool_call_id": "call00001", "name": "get_weather",
                           "content": RESULT}


def test_parallel_calls_are_answered_in_order():
    record = openai_record(messages=[
        {"role": "user", "content": "Paris and Rome?"},
        {"role": "assistant", "tool_calls": [
            {"id": "a", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "b", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
        {"role": "tool", "tool_call_id": "b", "content": "rain"},
        {"role": "tool", "content": "sun"},
        {"role": "assistant", "content": "ok"}])
    messages, _ = tool_conversation(record, "messages", "f.jsonl:1")
    assert [m.get("tool_call_id") for m in messages[2:4]] == ["call00002", "call00001"]


@pytest.mark.parametrize("name", NO_TOOLS)
def test_family_without_tool_support_is_named(name, tmp_path):
    with pytest.raises(DataError, match=r"tools\.jsonl:1: the chat template \(.*\) has no tool "
                                        "support"):
        build_examples(write(tmp_path, openai_record()), family_tokenizer(name), DataConfig())


def _call(args='{"city": "Paris"}', name="get_weather"):
    return {"role": "assistant", "tool_calls": [
        {"id": "c1", "function": {"name": name, "arguments": args}}]}


BAD = [
    (_call(name="get_time"), r"tools\.jsonl:2: messages\[1\]\.tool_calls\[0\] calls "
                             r"'get_time', which is not in tools \(get_weather\)"),
    (_call(args='{"city": Paris}'), r"tools\.jsonl:2: messages\[1\]\.tool_calls\[0\]\.arguments "
                                    r"is not valid JSON \(Expecting value at column 10\)"),
    (_call(args='["Paris"]'), r"tools\.jsonl:2: messages\[1\]\.tool_calls\[0\]\.arguments must "
                              "be a JSON object, got list"),
    ({"role": "assistant", "content": "no call"},
     r"tools\.jsonl:2: messages\[2\] answers no call \(tool_call_id 'c1' matches no"),
]


@pytest.mark.parametrize("turn,message", BAD, ids=["unknown_tool", "bad_json", "not_object",
                                                   "orphan_result"])
def test_malformed_calls_name_file_line_and_field(turn, message, tmp_path):
    record = openai_record()
    record["messages"][1] = turn
    path = write(tmp_path, openai_record(), record)
    with pytest.raises(DataError, match=message):
        build_examples(path, family_tokenizer("qwen2_5"), DataConfig())


def test_sharegpt_observation_without_a_call(tmp_path):
    record = sharegpt_record()
    del record["conversations"][1]
    record["conversations"].insert(2, {"from": "gpt", "value": "x"})
    with pytest.raises(DataError, match=r"tools\.jsonl:1: conversations\[1\] answers no call"):
        build_examples(write(tmp_path, record), family_tokenizer("qwen2_5"), DataConfig())


# -- chatml_tools: the tools template shipped for chatml models whose own has none (SmolLM2) ----
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "tools"


def chatml_tools_config(**over) -> DataConfig:
    return DataConfig(template="chatml_tools", max_length=1024, **over)


@pytest.mark.parametrize("layout", ["openai", "sharegpt"])
def test_chatml_tools_masking_token_by_token(layout, tmp_path):
    """data.template chatml_tools on a chatml tokenizer: the schemas in the system turn, the
    call as Hermes <tool_call> JSON, taught with the answer; the result never."""
    tok = family_tokenizer("qwen2_5")
    record = openai_record() if layout == "openai" else sharegpt_record()
    (ex,), _ = build_examples(write(tmp_path, record), tok, chatml_tools_config())
    text = tok.decode(ex.input_ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\n# Tools\n") and "You are Qwen" not in text
    assert ex.labels == expected_labels(tok, "qwen2_5", text, ex.input_ids)
    runs = taught(tok, ex)
    assert runs == ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                    '</tool_call><|im_end|>', "apple apple apple<|im_end|>"]
    assert f"<|im_start|>tool\n<tool_response>\n{RESULT}\n</tool_response><|im_end|>" in text


def test_chatml_tools_parallel_results_and_a_second_user_turn(tmp_path):
    """Two results in a row and a later user turn keep every prefix a prefix (Qwen2.5's own
    template groups results, which a prefix ending at the first one would render unclosed)."""
    record = openai_record(messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Paris and Rome?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "a", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "b", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
        {"role": "tool", "tool_call_id": "a", "content": "rain"},
        {"role": "tool", "tool_call_id": "b", "content": "sun"},
        {"role": "assistant", "content": "Rain, then sun."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "Any time."}])
    tok = family_tokenizer("qwen2_5")
    (ex,), _ = build_examples(write(tmp_path, record), tok, chatml_tools_config())
    text = tok.decode(ex.input_ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert ex.labels == expected_labels(tok, "qwen2_5", text, ex.input_ids)
    runs = taught(tok, ex)
    assert len(runs) == 3 and runs[0].startswith("Checking.\n<tool_call>") and \
        runs[0].count("<tool_call>") == 2, runs
    assert runs[1:] == ["Rain, then sun.<|im_end|>", "Any time.<|im_end|>"]


def test_a_template_without_tools_is_refused_by_name(tmp_path):
    """SmolLM2's own template is plain chatml: a tool conversation names the template."""
    with pytest.raises(DataError, match=r"tools\.jsonl:1: the chat template \(chatml\) has no "
                                        "tool support"):
        build_examples(write(tmp_path, openai_record()), family_tokenizer("qwen2_5"),
                       DataConfig(template="chatml"))


def test_the_adapter_folder_carries_its_template(tmp_path):
    from loratune.data.templates import TEMPLATE_FILE, TEMPLATES, adapters_template, store_template

    tools, plain, other = tmp_path / "tools", tmp_path / "plain", tmp_path / "other"
    for folder in (tools, plain, other):
        folder.mkdir()
    assert store_template(plain, None) is None and not (plain / TEMPLATE_FILE).exists()
    store_template(tools, "chatml_tools")
    store_template(other, "chatml")
    text, note = adapters_template([tools, tools])
    assert text == TEMPLATES["chatml_tools"] and "'chatml_tools'" in note
    assert adapters_template([plain]) is None and adapters_template([]) is None
    with pytest.raises(DataError, match=r"adapters \S+tools \(chat_template\.jinja: "
                                        r"'chatml_tools'\) and \S+plain \(no chat_template"):
        adapters_template([tools, plain])
    with pytest.raises(DataError, match=r"other \(chat_template\.jinja: 'chatml'\) and \S+tools"):
        adapters_template([other, tools])


def _make_data():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_tools_data", EXAMPLES / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _argument_values(path: Path) -> set[tuple]:
    from loratune.data.dataset import load_tool_conversations

    values = set()
    for messages, _ in load_tool_conversations(path, DataConfig(train=str(path))):
        for m in messages:
            for c in m.get("tool_calls", []):
                args = c["function"]["arguments"]
                if "from" in args:   # a currency pair is one value
                    args = dict(args, pair=(args.pop("from"), args.pop("to")))
                values |= {(c["function"]["name"], k, v) for k, v in args.items()
                           if k not in ("unit", "limit")}   # enums and small limits repeat
    return values


def test_bundled_tool_data_is_its_generator_output_and_reads(tmp_path):
    """The committed examples/tools files are make_data.py's output (seeded); they read through
    our readers into labelled examples; held-out argument values never appear in train."""
    _make_data().write(tmp_path)
    for name in ("train.jsonl", "heldout.jsonl"):
        assert (tmp_path / name).read_bytes() == (EXAMPLES / name).read_bytes(), name
    tok = family_tokenizer("qwen2_5")
    examples, stats = build_examples(EXAMPLES / "heldout.jsonl", tok, chatml_tools_config())
    assert stats.n_examples == 40 and stats.n_dropped == 0
    messages = [json.loads(line)["messages"] for line in
                (EXAMPLES / "heldout.jsonl").read_text().splitlines()]
    calls = [len(m.get("tool_calls", [])) for ms in messages for m in ms
             if m["role"] == "assistant"]
    assert {0, 1, 2} <= set(calls) and calls.count(0) >= 10 and calls.count(2) >= 3
    train, held = _argument_values(EXAMPLES / "train.jsonl"), \
        _argument_values(EXAMPLES / "heldout.jsonl")
    assert len(held) >= 30 and not train & held, sorted(train & held)[:5]
    assert {k for _, k, _ in held} == {"city", "amount", "pair", "minutes", "label", "name"}
