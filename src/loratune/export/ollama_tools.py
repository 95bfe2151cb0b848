"""The tool-calling part of the Ollama Modelfile's TEMPLATE, for the formats Ollama runs tools with.

Ollama renders `.Tools` (api.Tool), an assistant message's `.ToolCalls` and `tool` messages with
the model's Go template; the Jinja template does the same from OpenAI-style `tools`,
`tool_calls` and `tool` messages. Each candidate below is kept only when it renders the Jinja
template's text for the sample tool conversations (TOOL_CONVERSATIONS), with one allowance:
Ollama's `json` is Go's compact json.Marshal while Jinja's `tojson` writes ", " and ": " (Llama
3.1 even indents), so JSON values are compared with their spacing normalised (_compact_json).
"""

from __future__ import annotations

import json

# -- Hermes <tool_call> (Qwen2.5, Qwen3, loratune's chatml_tools) -------------------------------
_HERMES_SYSTEM = """{{- if .Tools }}<|im_start|>system
SYSTEM_OR_DEFAULT# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{{- range .Tools }}
{{ json . }}
{{- end }}
</tools>

For each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{{ else if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ DEFAULT }}"""

_HERMES_TURNS = """
{{- $prev := "" }}
{{- range $i, $m := .Messages }}
{{- if and (eq $prev "tool") (ne $m.Role "tool") }}GROUP_END{{ end }}
{{- if eq $m.Role "user" }}<|im_start|>user
{{ $m.Content }}<|im_end|>
{{ else if eq $m.Role "assistant" }}<|im_start|>assistant
{{- if $m.Content }}
{{ $m.Content }}{{ end }}
{{- range $m.ToolCalls }}
<tool_call>
{"name": "{{ .Function.Name }}", "arguments": {{ json .Function.Arguments }}}
</tool_call>
{{- end }}<|im_end|>
{{ else if eq $m.Role "tool" }}TOOL_TURN{{ end }}
{{- $prev = $m.Role }}
{{- end }}
{{- if eq $prev "tool" }}GROUP_END{{ end }}
{{- if ne $prev "assistant" }}<|im_start|>assistant
{{ end }}"""

# Qwen2.5/Qwen3: consecutive results share one user turn
_GROUPED = """{{ if ne $prev "tool" }}<|im_start|>user{{ end }}
<tool_response>
{{ $m.Content }}
</tool_response>"""
# chatml_tools: each result its own tool turn
_TOOL_TURN = """<|im_start|>tool
<tool_response>
{{ $m.Content }}
</tool_response><|im_end|>
"""


def _hermes(default_system: str | None, grouped: bool) -> str:
    if default_system:
        system = "{{ if .System }}{{ .System }}{{ else }}" + default_system + "{{ end }}\n\n"
        default = "{{ else }}<|im_start|>system\n" + default_system + "<|im_end|>\n{{ end }}"
    else:
        system, default = "{{ if .System }}{{ .System }}\n\n{{ end }}", "{{ end }}"
    turns = (_HERMES_TURNS.replace("TOOL_TURN", _GROUPED).replace("GROUP_END", "<|im_end|>\n")
             if grouped else _HERMES_TURNS.replace("TOOL_TURN", _TOOL_TURN)
             .replace("GROUP_END", ""))
    return (_HERMES_SYSTEM.replace("SYSTEM_OR_DEFAULT", system).replace("{{ DEFAULT }}", default)
            + turns)


# -- Llama 3.1/3.2: tools in the first user turn, calls as JSON, results in ipython turns ------
_LLAMA3 = """<|start_header_id|>system<|end_header_id|>

{{ if .Tools }}Environment: ipython
{{ end }}Cutting Knowledge Date: December 2023
Today Date: 26 Jul 2024

{{ if .System }}{{ .System }}{{ end }}<|eot_id|>
{{- $tools := .Tools }}
{{- $prev := "" }}
{{- range $i, $m := .Messages }}
{{- if eq $m.Role "user" }}<|start_header_id|>user<|end_header_id|>

{{ if $tools }}Given the following functions, please respond with a JSON for a function call \
with its proper arguments that best answers the given prompt.

Respond in the format {"name": function name, "parameters": dictionary of argument name and \
its value}.Do not use variables.

{{ range $tools }}{{ json . }}

{{ end }}{{ $tools = "" }}{{ end }}{{ $m.Content }}<|eot_id|>
{{- else if eq $m.Role "assistant" }}<|start_header_id|>assistant<|end_header_id|>

{{ if $m.ToolCalls }}{{ range $m.ToolCalls }}{"name": "{{ .Function.Name }}", \
"parameters": {{ json .Function.Arguments }}}{{ end }}{{ else }}{{ $m.Content }}{{ end }}\
<|eot_id|>
{{- else if eq $m.Role "tool" }}<|start_header_id|>ipython<|end_header_id|>

{{ json $m.Content }}<|eot_id|>
{{- end }}
{{- $prev = $m.Role }}
{{- end }}
{{- if ne $prev "assistant" }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}"""


def tool_candidates(format_name: str, default_system: str | None) -> dict[str, str]:
    """Tool-rendering templates for a text format modelfile.ollama_template chose; {} when
    Ollama runs no tools with that format here."""
    if format_name == "chatml":
        return {"hermes": _hermes(default_system, grouped=True),
                "hermes (one tool turn per result)": _hermes(default_system, grouped=False)}
    if format_name == "llama3":
        return {"llama3 json calls": _LLAMA3}
    return {}


# -- sample tool conversations and the values Ollama would pass ---------------------------------
# Written in the key order Ollama's structs marshal (required before properties, property fields
# type, description, enum; arguments sorted by name, a Go map): Jinja's tojson keeps the order it
# is given, so only then can the two texts agree.
def _tool(name: str, description: str, props: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description,
            "parameters": {"type": "object", "required": required, "properties": props}}}


TOOLS = [
    _tool("get_weather", "Current weather in a city.",
          {"city": {"type": "string", "description": "City name."},
           "unit": {"type": "string", "description": "Temperature unit.", "enum": ["c", "f"]}},
          ["city"]),
    _tool("add", "Add two integers.", {"a": {"type": "integer", "description": "First."},
                                       "b": {"type": "integer", "description": "Second."}},
          ["a", "b"]),
]


def _call(id_: str, name: str, arguments: dict) -> dict:
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": arguments}}


def _result(id_: str, name: str, content: str) -> dict:
    return {"role": "tool", "tool_call_id": id_, "name": name, "content": content}


_ASK = {"role": "user", "content": "Weather in Paris?"}
_CALL = {"role": "assistant", "content": "",
         "tool_calls": [_call("call00001", "get_weather", {"city": "Paris", "unit": "c"})]}
_RESULT = _result("call00001", "get_weather", '{"temp": 21}')
TOOL_CONVERSATIONS = [
    # tools declared, nothing called yet
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "What is the weather in Oslo?"}],
    # a call and its result, the model to answer
    [_ASK, _CALL, _RESULT],
    # ... the answer, and a new question
    [_ASK, _CALL, _RESULT, {"role": "assistant", "content": "21 C in Paris."},
     {"role": "user", "content": "Thanks. And 2+3?"}],
    # two calls in one turn, two results (templates that take one call a turn refuse it)
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Add 2 and 3, and the weather in Oslo?"},
     {"role": "assistant", "content": "", "tool_calls": [
         _call("call00002", "add", {"a": 2, "b": 3}),
         _call("call00003", "get_weather", {"city": "Oslo"})]},
     _result("call00002", "add", "5"), _result("call00003", "get_weather", '{"temp": 4}')],
]


def _ollama_tool(tool: dict) -> dict:
    """A tool as Ollama's api.Tool marshals it: struct field order, property names sorted."""
    f = tool["function"]
    p = f.get("parameters") or {}
    props = {name: {k: v[k] for k in ("type", "items", "description", "enum") if k in v}
             for name, v in sorted((p.get("properties") or {}).items())}
    params = {"type": p.get("type", "object"), "required": p.get("required"),
              "properties": props}
    return {"type": tool.get("type", "function"), "function": {
        "name": f["name"], "description": f.get("description", ""), "parameters": params}}


def _ollama_message(m: dict) -> dict:
    calls = [{"function": {"name": c["function"]["name"],
                           "arguments": dict(sorted(c["function"]["arguments"].items()))}}
             for c in m.get("tool_calls") or []]
    return {"Role": m["role"], "Content": m.get("content") or "", "ToolCalls": calls,
            "ToolName": m.get("name", "")}


def tool_values(messages: list[dict], tools: list[dict]) -> dict:
    """What Ollama hands a template for an OpenAI-style request: .System (the system messages
    joined), .Messages (system ones included, as Ollama's collate keeps them), .Tools."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return {"System": system, "Messages": [_ollama_message(m) for m in messages],
            "Tools": [_ollama_tool(t) for t in tools]}


def compact_json(text: str) -> str:
    """`text` with every JSON object or array in it rewritten without spaces between tokens."""
    decoder, out, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i] in "{[":
            try:
                value, end = decoder.raw_decode(text, i)
            except ValueError:
                value = None
            if isinstance(value, (dict, list)):
                out.append(json.dumps(value, ensure_ascii=False, separators=(",", ":")))
                i = end
                continue
        out.append(text[i])
        i += 1
    return "".join(out)
