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


def expected_labels(tok, name, text, ids):
    """Labels from the rendered text alone: from each assistant header (or the end of tool
    results, for Mistral) through the next end-of-turn token, and the final eos."""
    fam = FAMILY_SPECS[name]
    heads = [fam.assistant_header] + ([AFTER_RESULTS[name]] if name in AFTER_RESULTS else [])
    spans, at = [], 0
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
