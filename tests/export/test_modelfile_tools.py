"""The Ollama Modelfile's TEMPLATE renders tools (issue 27 item 5): for Llama 3.1/3.2, Qwen2.5/3
(Hermes <tool_call>) and loratune's chatml_tools, `.Tools`, `.ToolCalls` and `tool` messages as
Ollama passes them give the Jinja template's text (JSON spacing aside); other formats keep their
text-only TEMPLATE and the export says so in one line."""

import pytest

from families import build_family, save_family
from loratune.data.templates import TEMPLATES
from loratune.export.gotemplate import render
from loratune.export.modelfile import _jinja_prompt, ollama_template, with_tools, write_modelfile
from loratune.export.ollama_tools import TOOLS, compact_json, tool_values


# -- what the renderer gained -------------------------------------------------------------------
@pytest.mark.parametrize("template,want", [
    # range without variables: dot is the item; fields fall back to the JSON (lower-case) name
    ("{{ range .Tools }}[{{ .Function.Name }}]{{ end }}", "[f][g]"),
    ("{{ range $t := .Tools }}{{ $t.Type }};{{ end }}", "function;function;"),
    # Ollama's json: Go's compact json.Marshal, <, >, & escaped as Go does
    ("{{ json (slice .Tools 1) }}",
     '[{"type":"function","function":{"name":"g","d":"a\\u003cb\\u0026c"}}]'),
    ('{{ json .N }} {{ json .S }} {{ eq .N 2 }}', '2 "é\\"" true'),
])
def test_renderer_covers_what_the_tool_templates_use(template, want):
    tools = [{"type": "function", "function": {"name": "f"}},
             {"type": "function", "function": {"name": "g", "d": "a<b&c"}}]
    assert render(template, {"Tools": tools, "N": 2, "S": 'é"'}) == want


def test_compact_json_changes_json_spacing_only():
    text = 'x {"a": [1, {"b": "c d"}]} [INST] {"name": <f>, "arguments": <x>}\n{\n  "k": 1\n}'
    assert compact_json(text) == ('x {"a":[1,{"b":"c d"}]} [INST] {"name": <f>, "arguments": <x>}'
                                  '\n{"k":1}')


# -- each tool family: a conversation the template was not chosen on ----------------------------
def _call(id_, name, args):
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": args}}


def _held_out(parallel: bool) -> list[dict]:
    """A system message, a call, its result, an answer, a second question and its call(s)."""
    second = [_call("callrome1", "get_weather", {"city": "Rome", "unit": "f"})]
    results = [{"role": "tool", "tool_call_id": "callrome1", "name": "get_weather",
                "content": "cloudy"}]
    if parallel:
        second.append(_call("calladd01", "add", {"a": 40, "b": 2}))
        results.append({"role": "tool", "tool_call_id": "calladd01", "name": "add",
                        "content": "42"})
    return [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Is it warm in Lima?"},
            {"role": "assistant", "content": "",
             "tool_calls": [_call("calllima1", "get_weather", {"city": "Lima"})]},
            {"role": "tool", "tool_call_id": "calllima1", "name": "get_weather",
             "content": '{"temp": 25, "sky": "clear"}'},
            {"role": "assistant", "content": "Yes, 25 degrees."},
            {"role": "user", "content": "Rome, in F? Also 40+2."},
            {"role": "assistant", "content": "", "tool_calls": second}, *results]


def _tokenizer(name):
    if name == "chatml_tools":  # SmolLM2 tool adapters: chatml tokens, loratune's template
        _, tok = build_family("qwen2_5")
        tok.chat_template = TEMPLATES["chatml_tools"]
        return tok
    return build_family(name)[1]


@pytest.mark.parametrize("name,want,parallel", [
    ("llama3_1", "llama3 json calls", False),   # its template takes one call a turn
    ("llama3_2", "llama3 json calls", False),
    ("qwen2_5", "hermes", True),
    ("qwen3", "hermes", True),
    ("chatml_tools", "hermes (one tool turn per result)", True),
])
def test_tool_template_gives_the_jinja_prompt(name, want, parallel):
    tok = _tokenizer(name)
    text_only, how = ollama_template(tok)
    template, which, note = with_tools(tok, text_only, how)
    assert (which, note) == (want, None) and template != text_only
    # prompts for the next reply: after a result, after a second question, after two results
    # (one ending on an answer is no prompt: Ollama continues that answer, as text-only ones do)
    for end in (4, 6, len(_held_out(parallel))):
        msgs = _held_out(parallel)[:end]
        go = render(template, tool_values(msgs, TOOLS))
        jinja = _jinja_prompt(tok, msgs, TOOLS)
        assert compact_json(go) == compact_json(jinja), (end, go, jinja)
    # the tools, the calls and the results are in it, not merely equal on both sides
    assert '"name":"get_weather","description":"Current weather in a city."' in go
    assert '{"name": "get_weather", ' in go and '{"city":"Rome","unit":"f"}' in go
    assert "cloudy" in go and go.count("get_weather") >= 3
    # and without tools it still gives the text-only prompts (it replaces that template)
    plain = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": "Bye?"}]
    assert render(template, tool_values(plain, [])) == _jinja_prompt(tok, plain)


@pytest.mark.parametrize("name,how", [("mistral_v0_3", "mistral"), ("gemma3", "gemma"),
                                      ("phi4_mini", "phi4")])
def test_other_families_keep_the_text_template_with_a_note(name, how):
    tok = _tokenizer(name)
    text_only, found = ollama_template(tok)
    template, which, note = with_tools(tok, text_only, how)
    assert found == how and (template, which) == (text_only, how)
    assert f"{how} " in note and "\n" not in note


def test_export_writes_the_tool_template_or_prints_the_note(tmp_path, capsys):
    folder = save_family("qwen2_5", tmp_path / "qwen2_5")
    text = write_modelfile(tmp_path / "q.gguf", folder).read_text()
    assert "# TEMPLATE: the hermes format" in text and "{{- range .Tools }}" in text
    assert "note:" not in capsys.readouterr().out
    folder = save_family("mistral_v0_3", tmp_path / "mistral")
    text = write_modelfile(tmp_path / "m.gguf", folder).read_text()
    assert "# TEMPLATE: the mistral format" in text and ".Tools" not in text
    out = capsys.readouterr().out.splitlines()
    assert [x for x in out if x.startswith("note:")] == [
        x for x in out if "mistral TEMPLATE renders no tools" in x]
    assert len(out) == 1
