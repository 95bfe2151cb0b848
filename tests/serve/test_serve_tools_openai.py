"""Tool calling through the official `openai` client against a live `serve` (uvicorn, the real
Engine: tiny Llama, SmolLM2's tokenizer under Qwen2.5's chat template, so Hermes calls).

The random tiny model never calls a tool on its own; tool_choice named / "required" forces
the call (the grammar of tool_constraint.py), so the loop call -> tool result -> answer runs
deterministically, for the base and two adapters in one batch."""

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from loratune.serve.api import build_app
from loratune.serve.engine import Engine
from loratune.serve.pool import AdapterPool
from test_serve_api import BASE, adapter_dir, live_server, one_thread  # noqa: F401 (fixtures)
from tiny import tiny_llama

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {}}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
MODELS = [BASE, "adapter_en", "fin"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tools_engine(adapter_dir):
    from loratune.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")         # its own copy: the template changes
    tok.chat_template = (Path(__file__).parents[1] / "fixtures" / "templates"
                         / "qwen2_5.jinja").read_text()
    model = tiny_llama(vocab=len(tok))
    model.config.max_position_embeddings = 1024            # RoPE: the tools prompt is ~250
    engine = Engine(model, tok, AdapterPool(adapter_dir, max_adapters=3), base_name=BASE,
                    max_batch=4, max_prompt_tokens=640, max_completion_tokens=96).start()
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def client(tools_engine):
    import openai

    with live_server(build_app(tools_engine)) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def ask(client, model, messages, stream=False, **extra):
    """One chat request; a stream goes through the client's own accumulator
    (chat.completions.stream) and comes back as the completion it adds up to."""
    body = {"model": model, "messages": messages, "tools": [WEATHER, TIME], "temperature": 0,
            "max_tokens": 64, **extra}
    if not stream:
        return client.chat.completions.create(**body)
    with client.chat.completions.stream(**body) as s:
        for _ in s:
            pass
        # the accumulated chunks (get_final_completion() refuses a "length" answer)
        return s.current_completion_snapshot


def loop(client, model, stream=False):
    """call (named) -> tool result -> answer (tool_choice none); what each step returned."""
    first = ask(client, model, ASK, stream, tool_choice=NAMED).choices[0]
    calls = first.message.tool_calls
    messages = ASK + [{"role": "assistant", "content": None,
                       "tool_calls": [c.model_dump(include={"id", "type", "function"})
                                      for c in calls]},
                      {"role": "tool", "tool_call_id": calls[0].id, "content": "sunny, 21 C"}]
    final = ask(client, model, messages, stream, tool_choice="none").choices[0]
    return (first.finish_reason, [(c.function.name, c.function.arguments) for c in calls],
            final.finish_reason, final.message.content)


def test_call_result_answer_loop_for_base_and_two_adapters_in_one_batch(client):
    alone = {m: loop(client, m) for m in MODELS}
    for model, (finish, calls, final_finish, answer) in alone.items():
        assert finish == "tool_calls" and [n for n, _ in calls] == ["get_weather"]
        assert isinstance(json.loads(calls[0][1]), dict)
        assert final_finish in ("stop", "length") and answer
    assert len({a[1][0][1] for a in alone.values()}) > 1    # the adapters do change the answer
    with ThreadPoolExecutor(len(MODELS) * 2) as pool:        # every model twice, at once
        together = list(pool.map(lambda m: (m, loop(client, m, stream=m != BASE)),
                                 MODELS * 2))
    assert all(result == alone[m] for m, result in together), together


@pytest.mark.parametrize("choice", ["required", NAMED, "auto", "none"])
def test_streamed_answers_accumulate_to_the_plain_answer(client, choice):
    for model in ("adapter_en", BASE):
        plain = ask(client, model, ASK, tool_choice=choice).choices[0]
        streamed = ask(client, model, ASK, stream=True, tool_choice=choice).choices[0]
        assert streamed.finish_reason == plain.finish_reason
        got = [(c.function.name, c.function.arguments) for c in streamed.message.tool_calls or []]
        want = [(c.function.name, c.function.arguments) for c in plain.message.tool_calls or []]
        assert got == want and streamed.message.content == plain.message.content
        if choice in ("required", NAMED):
            assert plain.finish_reason == "tool_calls" and want
            assert choice == "required" or {n for n, _ in want} == {"get_weather"}
            assert all(isinstance(json.loads(a), dict) for _, a in want)
        else:
            assert not want and plain.message.content


def test_parallel_tool_calls_false_keeps_one_call(client):
    def calls(parallel, seed):
        out = ask(client, "fin", ASK, tool_choice="required", parallel_tool_calls=parallel,
                  temperature=1.0, seed=seed, max_tokens=96)
        return len(out.choices[0].message.tool_calls)

    # (the random model rarely closes a call early enough to start a second one; the
    # grammar's refusal of a second call is test_serve_tools_constraint's)
    assert [calls(False, seed) for seed in range(3)] == [1] * 3


def test_bad_tool_choices_are_400_naming_the_field(client):
    import openai

    for choice, words in [({"type": "function", "function": {"name": "nope"}},
                           "'nope' is not a function in tools"),
                          ({"type": "function"}, "expected 'auto', 'none', 'required'")]:
        with pytest.raises(openai.BadRequestError, match=words):
            ask(client, BASE, ASK, tool_choice=choice)
    with pytest.raises(openai.BadRequestError, match="needs at least"):
        ask(client, BASE, ASK, tool_choice="required", max_tokens=5)
