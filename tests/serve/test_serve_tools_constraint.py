"""Forced tool calls (tool_choice "required" / a named function): the byte-level JSON automaton
against json.loads, its closing budget against a search, each family's call grammar against the
family's own parser, and the constraint on the real engine beside unconstrained rows."""

import json
import random
from collections import deque

import pytest

from loratune.data.tool_calls import parse_tool_calls
from loratune.eval.generate import prompt_ids
from loratune.serve.json_bytes import JsonObject
from loratune.serve.tool_constraint import (EOS, FORMATS, CallReader, CallSpec, CallState,
                                            TokenTable, force_call, token_symbols)
from loratune.serve.types import GenerationRequest, SamplingParams
from test_serve_api import EN, adapter_dir, engine, one_thread  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")   # the engine tests decode on a shared CPU
PIECES = ['{', '}', '[', ']', '"a"', '"é"', ':', ',', ' ', '\n', '1', '-', '0', '.', 'e', '+',
          'true', 'nul', 'null', '"\\n"', '"\\u00e9"', '"\\x"', '"\t"', '"日本"', '5']


def accepts(text: str) -> bool:
    state = JsonObject()
    return all(state.feed(b) for b in text.encode()) and state.done


def loads_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict) and text == text.rstrip()
    except json.JSONDecodeError:
        return False


def test_json_object_agrees_with_json_loads():
    rng = random.Random(0)
    texts = ['{}', '{"a": [1, -2.5e+3, "x\\u00e9", true, null, {"b": {}}]}', ' {"é": "日本"}',
             '{"a": 01}', '{"a": 1,}', '{"a": 1.}', '[1]', '{"a": "\n"}', '{"a": .5}']
    texts += ["{" + "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 12)))
              for _ in range(20000)]
    texts += ['{"a": ' + rng.choice(['1', '-0', '2.5', '1e5', '-1.5E-3', '0.0']) + '}'
              for _ in range(200)]
    disagree = [t for t in texts if accepts(t) != loads_object(t)]
    assert not disagree, disagree[:5]
    assert sum(map(accepts, texts)) > 200          # the fuzz reaches valid objects too


def shortest_close(state: JsonObject) -> int:
    """Breadth-first search over the bytes that can close anything: the true shortest
    completion of `state`."""
    seen, todo = set(), deque([(state, 0)])
    while todo:
        s, depth = todo.popleft()
        if s.done:
            return depth
        key = (s.mode, s.stack, s.key, s.rest, s.cont, s.num)
        if key in seen or depth > 40:
            continue
        seen.add(key)
        for b in b'"}]:0,\x80' + bytes(range(97, 123)):
            t = s.copy()
            if t.feed(b):
                todo.append((t, depth + 1))
    raise AssertionError("no completion found")


def test_need_is_the_shortest_completion():
    rng = random.Random(1)
    checked = 0
    for _ in range(3000):
        state = JsonObject()
        for b in ("{" + "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 8)))).encode() \
                + bytes([0xE6]) * rng.randint(0, 1):
            nxt = state.copy()
            if not nxt.feed(b) or nxt.done:
                break
            state = nxt
            assert state.need() == shortest_close(state), bytes(b)
            checked += 1
    assert checked > 3000


CALL_TEXT = {   # what a model writes after the prompt's forced opener, per family
    "hermes": ' "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n<tool_call>\n'
              '{"name": "get_time", "arguments": {}}\n</tool_call>',
    "llama3_json": ' "get_weather", "parameters": {"city": "Paris"}}',
    "mistral": ' "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", '
               '"arguments": {}}]',
    "phi4": ' "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", '
            '"arguments": {}}]<|/tool_call|>',
}
NAMES = ["get_weather", "get_time"]


@pytest.mark.parametrize("parser", sorted(FORMATS))
def test_each_familys_grammar_writes_what_its_parser_reads(parser):
    text = CALL_TEXT[parser]
    body = text.removesuffix("<|/tool_call|>").encode()
    reader = CallReader(CallSpec(parser, NAMES, parallel=True),
                        TokenTable([(b,) for b in range(256)]))
    deltas = reader.feed(list(body))
    calls = reader.complete()
    assert calls is not None and not reader.broken
    _, parsed = parse_tool_calls(FORMATS[parser].opener + text, parser, set(NAMES))
    want = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] \
        == want and len(want) == (1 if parser == "llama3_json" else 2)
    # the stream: a header (id, type, name, "") per call, then its argument text by index
    heads = [d for d in deltas if "id" in d]
    assert [(d["index"], d["function"]) for d in heads] == \
        [(i, {"name": n, "arguments": ""}) for i, (n, _) in enumerate(want)]
    for i, c in enumerate(calls):
        assert "".join(d["function"]["arguments"] for d in deltas
                       if d["index"] == i and "id" not in d) == c["function"]["arguments"]


def test_grammar_refuses_undeclared_names_a_second_call_when_not_parallel_and_early_eos():
    def feeds(spec, text, end=False):
        state = CallState(spec)
        return all(state.feed(b) for b in list(text.encode()) + ([EOS] if end else []))

    one = CallSpec("hermes", ["get_weather"], parallel=False)
    assert feeds(one, ' "get_weather", "arguments": {}}\n</tool_call>', end=True)
    assert not feeds(one, ' "get_time"')
    assert not feeds(one, ' "get_weather", "arguments": {}}\n</tool_call>\n<tool_call>')
    assert not feeds(one, ' "get_weather", "arguments": {', end=True)
    assert feeds(CallSpec("hermes", NAMES, parallel=True),
                 ' "get_weather", "arguments": {}}\n</tool_call>\n<tool_call>')


# -- on the engine ------------------------------------------------------------------------------
def forced(engine, parser, names, params, parallel=True, model="adapter_en"):
    tok = engine.tokenizer
    suffix, constraint, reader = force_call(tok, engine.eos, parser, names, parallel,
                                            params.max_tokens)
    params.constraint = constraint
    return GenerationRequest(prompt_ids(tok, EN) + suffix, engine.resolve(model), params), reader


def plain(engine, model, max_tokens=12):
    return GenerationRequest(prompt_ids(engine.tokenizer, EN), engine.resolve(model),
                             SamplingParams(max_tokens=max_tokens, temperature=0.0))


def run_together(engine, requests):
    """Submit all at once (they share batches), return each one's result."""
    handles = [engine.submit(r) for r in requests]
    return [h.result() for h in handles]


def calls_of(reader, result):
    reader.feed(result.token_ids)
    return reader.complete()


@pytest.mark.parametrize("parser", ["hermes", "mistral"])
def test_forced_calls_are_valid_and_leave_other_rows_as_they_were(engine, parser):
    alone = [engine.submit(plain(engine, m)).result() for m in ("fin", "tiny-base")]
    req, reader = forced(engine, parser, NAMES, SamplingParams(max_tokens=48, temperature=0.0))
    again, reader2 = forced(engine, parser, NAMES, SamplingParams(max_tokens=48,
                                                                   temperature=0.0))
    mixed = run_together(engine, [plain(engine, "fin"), req, plain(engine, "tiny-base")])
    assert [(r.text, r.token_ids) for r in (mixed[0], mixed[2])] == \
        [(r.text, r.token_ids) for r in alone]
    calls = calls_of(reader, mixed[1])
    assert calls and calls[0]["function"]["name"] in NAMES, mixed[1].text
    assert isinstance(json.loads(calls[0]["function"]["arguments"]), dict)
    assert mixed[1].finish_reason == "stop"
    solo = engine.submit(again).result()          # the forced row alone: the same tokens
    assert solo.token_ids == mixed[1].token_ids and calls_of(reader2, solo)


def test_a_named_call_in_few_tokens_and_sampled_calls_close_and_repeat(engine):
    spec = CallSpec("hermes", ["get_weather"], parallel=False)
    tight = spec.name_need + 2
    req, reader = forced(engine, "hermes", ["get_weather"],
                         SamplingParams(max_tokens=tight, temperature=0.0), parallel=False)
    out = engine.submit(req).result()
    assert calls_of(reader, out)[0]["function"]["name"] == "get_weather", out.text
    texts = []
    for seed in (1, 1):
        req, reader = forced(engine, "hermes", NAMES, SamplingParams(
            max_tokens=48, temperature=1.0, seed=seed))
        out = engine.submit(req).result()
        calls = calls_of(reader, out)
        assert calls and all(isinstance(json.loads(c["function"]["arguments"]), dict)
                             for c in calls), out.text
        texts.append(out.text)
    assert texts[0] == texts[1]


def test_max_tokens_below_the_shortest_call_is_refused(engine):
    from loratune.serve.types import ServeError

    with pytest.raises(ServeError, match="needs at least"):
        force_call(engine.tokenizer, engine.eos, "hermes", NAMES, True, 3)


def test_token_table_spells_tokens_as_the_tokenizer_decodes_them(engine):
    tok = engine.tokenizer
    table = token_symbols(tok, engine.eos)
    ids = tok('{"city": "Zürich 日本"}\n', add_special_tokens=False)["input_ids"]
    assert b"".join(bytes(table[i]) for i in ids).decode() == tok.decode(ids)
    assert all(table[i] == (EOS,) for i in engine.eos) and table[len(tok) + 5] is None
    assert all(table[i] is None for i in tok.all_special_ids if i not in engine.eos)


def test_each_step_tries_few_tokens_when_logits_favour_words(smol_tokenizer, monkeypatch):
    """Logits favouring words (` the`, `ing`...) near max_tokens: each step used to try tens of
    thousands of tokens in Python (first byte taken, refused later or over budget); now the
    candidates are cut to (nearly) the valid ones before any is tried."""
    import torch

    from loratune.serve import tool_constraint

    eos = {smol_tokenizer.eos_token_id}
    table = token_symbols(smol_tokenizer, eos)
    logits = torch.tensor([5.0 + 0.1 * len(s) if s and s != (EOS,) and
                           all(chr(b).isalpha() or b == 32 for b in s) else 0.0
                           for s in table.syms])
    tries, per_step = [0], []
    fits = tool_constraint.ToolConstraint.fits
    monkeypatch.setattr(tool_constraint.ToolConstraint, "fits",
                        lambda self, t: tries.__setitem__(0, tries[0] + 1) or fits(self, t))
    for temperature in (0.0, 1.0):
        _, con, reader = force_call(smol_tokenizer, eos, "hermes", NAMES, True, 45)
        params = SamplingParams(max_tokens=45, temperature=temperature, seed=0)
        generator, ids = torch.Generator().manual_seed(0), []
        while not ids or table[ids[-1]] != (EOS,):
            tries[0] = 0
            ids.append(con.choose(logits, params, generator))
            per_step.append(tries[0])
        reader.feed(ids[:-1])          # the engine keeps the end token out of the answer
        assert len(ids) <= 45 and reader.complete(), ids
    assert max(per_step) <= 8, per_step
