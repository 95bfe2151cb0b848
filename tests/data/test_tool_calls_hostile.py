"""Hostile tool-call JSON: a request's call arguments and a model's answer that nest thousands
deep or open thousands of tags end as a clear refusal or as plain content, in linear time."""

import time

import pytest

from loratune.data.tool_calls import parse_tool_calls
from loratune.data.tools import tool_conversation
from loratune.data.errors import DataError

TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}


def deep(n: int) -> str:
    return "[" * n + "]" * n


def test_deeply_nested_request_arguments_are_a_data_error():
    record = {"tools": [TOOL], "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
         "function": {"name": "get_weather", "arguments": deep(100_000)}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]}
    with pytest.raises(DataError, match=r"request: messages\[1\]\.tool_calls\[0\]\.arguments "
                                        r"nests arrays or objects too deeply"):
        tool_conversation(record, "messages", "request", answer_last=False)


@pytest.mark.parametrize("parser,tag", [("hermes", "<tool_call>"), ("phi4", "<|tool_call|>"),
                                        ("llama3_json", ""), ("mistral", "[TOOL_CALLS]")])
def test_deeply_nested_answer_stays_content(parser, tag):
    text = tag + deep(100_000) + tag.replace("<", "</").replace("</|", "<|/")
    assert parse_tool_calls(text, parser, {"get_weather"}) == (text, [])


@pytest.mark.parametrize("parser,tag", [("hermes", "<tool_call>"), ("phi4", "<|tool_call|>")])
def test_thousands_of_unclosed_tags_parse_in_linear_time(parser, tag):
    text = tag * 20_000 + "x"          # the lazy regex took ~0.5 s per 1000 tags, squared
    start = time.perf_counter()
    assert parse_tool_calls(text, parser, {"get_weather"}) == (text, [])
    assert time.perf_counter() - start < 0.5


def test_blocks_are_read_as_before():
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "%s"}}\n</tool_call>'
    content, calls = parse_tool_calls("Let me look. " + call % "Paris" + "\n" + call % "Rome"
                                      + "<tool_call>", "hermes", {"get_weather"})
    assert content == "Let me look."
    assert [c["function"]["arguments"] for c in calls] == ['{"city": "Paris"}',
                                                           '{"city": "Rome"}']
