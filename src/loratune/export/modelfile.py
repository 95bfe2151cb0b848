"""An Ollama Modelfile beside an exported GGUF: FROM, TEMPLATE, PARAMETER stop, ADAPTER.

Ollama renders prompts with Go templates, not the model's Jinja chat template. The TEMPLATE is
chosen by behaviour: each candidate below (one per chat format: Llama 3, ChatML, Mistral,
Gemma, Phi-3, Phi-4) is rendered (gotemplate.render) on sample conversations, with and without
a system message, and must give exactly the text the model's own Jinja template gives (less
the BOS token, which llama.cpp adds when tokenizing). A model whose template none reproduces
gets a Modelfile without TEMPLATE, saying so.

Tools: for the formats Ollama runs tools with (Llama 3.1/3.2 JSON calls, Hermes `<tool_call>` of
Qwen2.5 and loratune's chatml_tools), a second candidate renders `.Tools`, assistant
`.ToolCalls` and `tool` messages as Ollama passes them (tool_values); it replaces the text-only
one when it gives the Jinja template's text on tool conversations too, JSON spacing aside
(Ollama's `json` is compact, Jinja's `tojson` spaced). Otherwise the text-only one stays and
the export says so in one line naming the format.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

_RANGE = """
{{- range $i, $m := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}"""

_CHATML = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ DEFAULT }}""" + _RANGE + """
{{- if eq $m.Role "user" }}<|im_start|>user
{{ $m.Content }}<|im_end|>
{{ if $last }}<|im_start|>assistant
{{ end }}
{{- else if eq $m.Role "assistant" }}<|im_start|>assistant
{{ $m.Content }}<|im_end|>
{{ end }}
{{- end }}"""

_LLAMA3 = """HEADER""" + _RANGE + """
{{- if eq $m.Role "user" }}<|start_header_id|>user<|end_header_id|>

{{ $m.Content }}<|eot_id|>
{{- if $last }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- else if eq $m.Role "assistant" }}<|start_header_id|>assistant<|end_header_id|>

{{ $m.Content }}<|eot_id|>
{{- end }}
{{- end }}"""
_LLAMA3_DATED = """<|start_header_id|>system<|end_header_id|>

Cutting Knowledge Date: December 2023
Today Date: 26 Jul 2024

{{ if .System }}{{ .System }}{{ end }}<|eot_id|>"""
_LLAMA3_PLAIN = """{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>
{{- end }}"""

_MISTRAL = """{{- range $i, $m := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq $m.Role "user" }}[INST] {{ if and $.System $last }}{{ $.System }}

{{ end }}{{ $m.Content }}[/INST]
{{- else if eq $m.Role "assistant" }} {{ $m.Content }}</s>
{{- end }}
{{- end }}"""

_GEMMA = """{{- $sys := .System }}""" + _RANGE + """
{{- if eq $m.Role "user" }}<start_of_turn>user
{{ if $sys }}{{ $sys }}

{{ end }}{{ $m.Content }}<end_of_turn>
{{ if $last }}<start_of_turn>model
{{ end }}
{{- $sys = "" }}
{{- else if eq $m.Role "assistant" }}<start_of_turn>model
{{ $m.Content }}<end_of_turn>
{{ end }}
{{- end }}"""

_PHI3 = """{{- if .System }}<|system|>
{{ .System }}<|end|>
{{ end }}""" + _RANGE + """
{{- if eq $m.Role "user" }}<|user|>
{{ $m.Content }}<|end|>
{{ if $last }}<|assistant|>
{{ end }}
{{- else if eq $m.Role "assistant" }}<|assistant|>
{{ $m.Content }}<|end|>
{{ end }}
{{- end }}"""

_PHI4 = """{{- if .System }}<|system|>{{ .System }}<|end|>{{ end }}""" + _RANGE + """
{{- if eq $m.Role "user" }}<|user|>{{ $m.Content }}<|end|>
{{- if $last }}<|assistant|>{{ end }}
{{- else if eq $m.Role "assistant" }}<|assistant|>{{ $m.Content }}<|end|>
{{- end }}
{{- end }}"""

SYSTEM = "You are terse."
TURNS = [{"role": "user", "content": "Name a color."},
         {"role": "assistant", "content": "Blue."},
         {"role": "user", "content": "And another?"}]


def _candidates(default_system: str | None) -> dict[str, str]:
    chatml_default = ("{{ else }}<|im_start|>system\n" + default_system + "<|im_end|>\n{{ end }}"
                      if default_system else "{{ end }}")
    return {
        "chatml": _CHATML.replace("{{ DEFAULT }}", chatml_default),
        "llama3": _LLAMA3.replace("HEADER", _LLAMA3_DATED),
        "llama3-plain": _LLAMA3.replace("HEADER", _LLAMA3_PLAIN),
        "mistral": _MISTRAL,
        "gemma": _GEMMA,
        "phi3": _PHI3,
        "phi4": _PHI4,
    }


def _jinja_prompt(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> str:
    """The Jinja template's prompt for `messages`, less the BOS llama.cpp adds when tokenizing."""
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                         add_generation_prompt=True, date_string="26 Jul 2024")
    bos = tokenizer.bos_token
    if bos is not None and text.startswith(bos) and \
            tokenizer("x").input_ids[:1] == [tokenizer.bos_token_id]:
        text = text[len(bos):]
    return text


def _jinja_renders(tokenizer) -> list[tuple[str | None, list[dict], str]]:
    """(system, turns, the Jinja template's prompt) for the sample conversations; a template
    that refuses a system role gets it folded into the first user turn."""
    from jinja2 import TemplateError

    out = []
    for system in (None, SYSTEM):
        for turns in (TURNS[:1], TURNS):
            msgs = ([{"role": "system", "content": system}] if system else []) + turns
            try:
                text = _jinja_prompt(tokenizer, msgs)
            except TemplateError:
                folded = [dict(turns[0], content=f"{system}\n\n{turns[0]['content']}")]
                text = _jinja_prompt(tokenizer, folded + turns[1:])
            out.append((system, turns, text))
    return out


def _default_system(cases) -> str | None:
    """The system text a chatml template writes when given none (Qwen2.5's "You are Qwen...")."""
    plain = next(text for system, turns, text in cases if system is None and len(turns) == 1)
    m = re.match(r"<\|im_start\|>system\n(.*?)<\|im_end\|>\n", plain, re.S)
    return m.group(1) if m else None


def _gives(template: str, cases) -> bool:
    """Whether `template` renders each sample conversation as the Jinja template does."""
    from loratune.export.gotemplate import render

    return all(render(template, {"System": system or "", "Messages": [
        {"Role": t["role"], "Content": t["content"]} for t in turns]}) == text
        for system, turns, text in cases)


def ollama_template(tokenizer) -> tuple[str | None, str]:
    """(Go template or None, which one / why none) for a tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return None, "the model has no chat template: Ollama sends prompts as they are"
    cases = _jinja_renders(tokenizer)
    for name, template in _candidates(_default_system(cases)).items():
        if _gives(template, cases):
            return template, name
    return None, ("none of loratune's Ollama templates (Llama 3, ChatML, Mistral, Gemma, "
                  "Phi-3, Phi-4) reproduces this chat template; write a TEMPLATE by hand")


def _jinja_has_tools(tokenizer) -> bool:
    """Whether the Jinja template writes anything for a request's `tools`."""
    from jinja2 import TemplateError

    from loratune.export.ollama_tools import TOOLS

    turn = [{"role": "user", "content": "Hi."}]
    try:
        return _jinja_prompt(tokenizer, turn, TOOLS) != _jinja_prompt(tokenizer, turn)
    except TemplateError:
        return False


def _renders_tools(tokenizer, template: str) -> bool:
    """Whether `template` gives the Jinja template's text on every sample tool conversation the
    Jinja template accepts, JSON spacing aside."""
    from jinja2 import TemplateError

    from loratune.export.gotemplate import render
    from loratune.export.ollama_tools import TOOL_CONVERSATIONS, TOOLS, compact_json, tool_values

    checked = 0
    for messages in TOOL_CONVERSATIONS:
        try:
            jinja = _jinja_prompt(tokenizer, messages, TOOLS)
        except TemplateError:  # e.g. Llama 3.1 takes one call a turn
            continue
        if compact_json(render(template, tool_values(messages, TOOLS))) != compact_json(jinja):
            return False
        checked += 1
    return checked > 0


def with_tools(tokenizer, template: str, how: str) -> tuple[str, str, str | None]:
    """(template, which, note): the `how` format's tool-rendering template when one gives the
    Jinja template's tool prompts; else the text-only one and a one-line note naming `how`."""
    from loratune.export.ollama_tools import tool_candidates

    cases = _jinja_renders(tokenizer)
    candidates = tool_candidates(how, _default_system(cases))
    if not _jinja_has_tools(tokenizer):
        return template, how, (f"the {how} chat template renders no request tools, so the "
                               "Modelfile's TEMPLATE renders none either")
    for name, tools_template in candidates.items():
        # it replaces the text-only template, so it must give the text-only prompts too
        if _gives(tools_template, cases) and _renders_tools(tokenizer, tools_template):
            return tools_template, name, None
    why = ("no tool template of loratune's reproduces its chat template's tool prompts"
           if candidates else "loratune writes Ollama tool templates for Llama 3.1/3.2 and "
           "Hermes <tool_call> (Qwen2.5, chatml_tools) only")
    return template, how, (f"the Modelfile's {how} TEMPLATE renders no tools ({why}); "
                           "llama-server --jinja renders them from the GGUF")


def stop_tokens(folder: Path, tokenizer) -> list[str]:
    """The texts of the generation config's eos ids and the tokenizer's eos, in that order."""
    path = folder / "generation_config.json"
    ids = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
    ids = (ids if isinstance(ids, list) else [ids]) + [tokenizer.eos_token_id]
    texts = []
    for i in ids:
        if i is not None:
            text = tokenizer.convert_ids_to_tokens(int(i))
            if text and text not in texts:
                texts.append(text)
    return texts


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def modelfile_text(folder: Path, from_ref: str, adapter: str | None = None
                   ) -> tuple[str, str | None]:
    """(the Modelfile for the model in `folder`, a one-line note when its TEMPLATE renders no
    tools)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    template, how = ollama_template(tokenizer)
    note = None
    lines = ["# Ollama Modelfile written by loratune: ollama create NAME -f <this file>",
             f"FROM {from_ref}"]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    if template is None:
        lines.append(f"# no TEMPLATE: {how}")
    else:
        template, how, note = with_tools(tokenizer, template, how)
        if '"""' in template:
            raise ValueError("the chat template contains \"\"\", which a Modelfile cannot quote")
        lines.append(f"# TEMPLATE: the {how} format, checked against the model's chat template")
        lines.append(f'TEMPLATE """{template}"""')
    lines += [f"PARAMETER stop {_quote(t)}" for t in stop_tokens(folder, tokenizer)]
    return "\n".join(lines) + "\n", note


def write_modelfile(gguf_path: Path, folder: Path, from_ref: str | None = None,
                    overwrite: bool = False) -> Path:
    """`<gguf stem>.Modelfile` beside `gguf_path`. A model GGUF is its own FROM; an adapter
    GGUF (from_ref given: the base model) is the ADAPTER. Prints the note when its TEMPLATE
    renders no tools."""
    from loratune.files import write_atomic_file

    out = gguf_path.with_suffix(".Modelfile")
    local = f"./{gguf_path.name}"
    text, note = (modelfile_text(folder, from_ref, adapter=local) if from_ref
                  else modelfile_text(folder, local))
    path = write_atomic_file(out, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite)
    if note:
        print(f"note: {note}")
    return path
