"""Tool calls through /v1/chat/completions on the real Engine (tiny Llama, SmolLM2 tokenizer):
the engine's answer is scripted (a random model never writes a call), everything after it is
the server's: parsing by the family's format, finish_reason, stream shape, a call -> result ->
answer round trip, and the refusals."""

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from loratune.serve.api import build_app
from loratune.data.tool_calls import parse_tool_calls, parser_for_template
from loratune.serve.types import Event
from test_serve_api import LOCAL, adapter_dir, engine, sse_events  # noqa: F401 (fixtures)

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ASK = [{"role": "user", "content": "Weather in Paris and Rome?"}]
CALLS = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
         '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>')


class Scripted:
    """A handle whose answer is `text`, in two pieces, then "stop"."""

    def __init__(self, text):
        self.text = text

    async def aiter(self):
        half = len(self.text) // 2
        yield Event(text=self.text[:half])
        yield Event(text=self.text[half:])
        yield Event(finish_reason="stop", prompt_tokens=5, completion_tokens=7)

    def cancel(self):
        pass


@pytest.fixture
def scripted(engine, monkeypatch):
    """client, prompts: every request answers with script["text"]; its prompt ids are kept."""
    script, prompts = {"text": CALLS}, []

    def submit(req):
        prompts.append(req.prompt_ids if hasattr(req, "prompt_ids") else req)
        return Scripted(script["text"])

    monkeypatch.setattr(engine, "submit", submit)
    # Qwen2.5's published template (Hermes calls): the parser is chosen from it
    qwen = (Path(__file__).parents[1] / "fixtures" / "templates" / "qwen2_5.jinja").read_text()
    monkeypatch.setattr(engine.tokenizer, "chat_template", qwen)
    with TestClient(build_app(engine), base_url=LOCAL) as c:
        yield c, script


def post(client, **body):
    return client.post("/v1/chat/completions", json={"model": "tiny-base", "messages": ASK,
                                                     "tools": [WEATHER], **body})


def test_calls_are_parsed_with_finish_reason_tool_calls(scripted):
    client, _ = scripted
    r = post(client)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    calls = choice["message"]["tool_calls"]
    assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in calls] == [("function", "get_weather", {"city": "Paris"}),
                                ("function", "get_weather", {"city": "Rome"})]
    assert choice["message"]["content"] is None
    one = post(client, parallel_tool_calls=False).json()["choices"][0]["message"]["tool_calls"]
    assert len(one) == 1


def test_no_call_without_tools_or_with_tool_choice_none(scripted):
    client, script = scripted
    for body in ({"tool_choice": "none"}, {"tools": None}):
        choice = post(client, **body).json()["choices"][0]
        assert choice["finish_reason"] == "stop" and choice["message"]["content"] == CALLS
    script["text"] = "It is sunny."
    r = post(client)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["content"] == "It is sunny."


def test_stream_sends_calls_as_deltas(scripted):
    client, _ = scripted
    with client.stream("POST", "/v1/chat/completions", json={
            "model": "tiny-base", "messages": ASK, "tools": [WEATHER], "stream": True}) as r:
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    deltas = [e["choices"][0]["delta"] for e in events[1:-1]]
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    # as OpenAI streams them: id, type, name and "" first, then the arguments by index
    assert [(c["index"], c["function"]) for c in calls if "id" in c] == [
        (0, {"name": "get_weather", "arguments": ""}), (1, {"name": "get_weather",
                                                            "arguments": ""})]
    assert all(c["id"] and c["type"] == "function" for c in calls if "id" in c)
    assert [(c["index"], json.loads(c["function"]["arguments"])) for c in calls
            if "id" not in c] == [(0, {"city": "Paris"}), (1, {"city": "Rome"})]
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"


def test_round_trip_call_result_answer_is_accepted(scripted):
    client, script = scripted
    call = post(client).json()["choices"][0]["message"]
    script["text"] = "Paris is sunny, Rome rainy."
    messages = ASK + [{"role": "assistant", "content": None, "tool_calls": call["tool_calls"]}] \
        + [{"role": "tool", "tool_call_id": c["id"], "content": w}
           for c, w in zip(call["tool_calls"], ["sunny", "rainy"])]
    r = post(client, messages=messages)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "Paris is sunny, Rome rainy."


@pytest.mark.parametrize("body,words", [
    ({"tool_choice": "required", "tools": None}, "'required' needs tools to call"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "'nope' is not a function in tools (declared: get_weather)"),
    ({"tool_choice": {"type": "function", "name": "get_weather"}}, "expected 'auto', 'none'"),
    ({"tool_choice": "sometimes"}, "expected 'auto', 'none', 'required' or"),
    ({"messages": ASK + [{"role": "tool", "tool_call_id": "x", "content": "1"}]},
     "answers no call"),
    ({"messages": ASK + [{"role": "assistant", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "nope", "arguments": "{}"}}]}]},
     "calls 'nope', which is not in tools"),
])
def test_refusals_are_400(scripted, body, words):
    client, _ = scripted
    r = post(client, **body)
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("parser,text,calls", [
    ("hermes", CALLS, [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Oslo"}}',
     [("get_weather", {"city": "Oslo"})]),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}}]',
     [("get_weather", {"city": "Oslo"})]),
    ("mistral", '[{"name": "get_weather", "arguments": {"city": "Oslo"}}]',
     [("get_weather", {"city": "Oslo"})]),
    ("phi4", '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Oslo"}}]'
             '<|/tool_call|>', [("get_weather", {"city": "Oslo"})]),
    ("hermes", '<tool_call>\n{"name": "other", "arguments": {}}\n</tool_call>', []),
    ("llama3_json", '{"name": "get_weather", "parameters": "not json"}', []),
])
def test_parsers(parser, text, calls):
    _, got = parse_tool_calls(text, parser, {"get_weather"})
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got] == calls


def test_parser_chosen_from_the_family_template():
    folder = Path(__file__).parents[1] / "fixtures" / "templates"
    got = {n: parser_for_template((folder / f"{n}.jinja").read_text())
           for n in ("llama3_1", "qwen3", "mistral_v0_3", "phi4_mini", "gemma2")}
    assert got == {"llama3_1": "llama3_json", "qwen3": "hermes", "mistral_v0_3": "mistral",
                   "phi4_mini": "phi4", "gemma2": None}
