"""An Ollama Modelfile beside an exported GGUF: FROM, TEMPLATE, PARAMETER stop, ADAPTER.

Ollama renders prompts with Go templates, not the model's Jinja chat template. The TEMPLATE is
chosen by behaviour: each candidate below (one per chat format: Llama 3, ChatML, Mistral,
Gemma, Phi-3, Phi-4) is rendered (gotemplate.render) on sample conversations, with and without
a system message, and must give exactly the text the model's own Jinja template gives (less
the BOS token, which llama.cpp adds when tokenizing). Tool calls are not part of these
templates. A model whose template none reproduces gets a Modelfile without TEMPLATE, saying so.
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


def _jinja_renders(tokenizer) -> list[tuple[str | None, list[dict], str]]:
    """(system, turns, the Jinja template's prompt) for the sample conversations; a template
    that refuses a system role gets it folded into the first user turn."""
    from jinja2 import TemplateError

    bos = tokenizer.bos_token
    adds_bos = bos is not None and tokenizer("x").input_ids[:1] == [tokenizer.bos_token_id]
    out = []
    for system in (None, SYSTEM):
        for turns in (TURNS[:1], TURNS):
            msgs = ([{"role": "system", "content": system}] if system else []) + turns
            try:
                text = tokenizer.apply_chat_template(msgs, tokenize=False,
                                                     add_generation_prompt=True,
                                                     date_string="26 Jul 2024")
            except TemplateError:
                folded = [dict(turns[0], content=f"{system}\n\n{turns[0]['content']}")]
                text = tokenizer.apply_chat_template(folded + turns[1:], tokenize=False,
                                                     add_generation_prompt=True,
                                                     date_string="26 Jul 2024")
            if adds_bos and text.startswith(bos):
                text = text[len(bos):]  # llama.cpp adds it when it tokenizes the prompt
            out.append((system, turns, text))
    return out


def ollama_template(tokenizer) -> tuple[str | None, str]:
    """(Go template or None, which one / why none) for a tokenizer's chat template."""
    from loratune.export.gotemplate import render

    if not getattr(tokenizer, "chat_template", None):
        return None, "the model has no chat template: Ollama sends prompts as they are"
    cases = _jinja_renders(tokenizer)
    plain = next(text for system, turns, text in cases if system is None and len(turns) == 1)
    m = re.match(r"<\|im_start\|>system\n(.*?)<\|im_end\|>\n", plain, re.S)
    for name, template in _candidates(m.group(1) if m else None).items():
        if all(render(template, {"System": system or "", "Messages": [
                {"Role": t["role"], "Content": t["content"]} for t in turns]}) == text
               for system, turns, text in cases):
            return template, name
    return None, ("none of loratune's Ollama templates (Llama 3, ChatML, Mistral, Gemma, "
                  "Phi-3, Phi-4) reproduces this chat template; write a TEMPLATE by hand")


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


def modelfile_text(folder: Path, from_ref: str, adapter: str | None = None) -> str:
    """The Modelfile for the model in `folder` (its tokenizer and generation config)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    template, how = ollama_template(tokenizer)
    lines = ["# Ollama Modelfile written by loratune: ollama create NAME -f <this file>",
             f"FROM {from_ref}"]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    if template is None:
        lines.append(f"# no TEMPLATE: {how}")
    else:
        if '"""' in template:
            raise ValueError("the chat template contains \"\"\", which a Modelfile cannot quote")
        lines.append(f"# TEMPLATE: the {how} format, checked against the model's chat template")
        lines.append(f'TEMPLATE """{template}"""')
    lines += [f"PARAMETER stop {_quote(t)}" for t in stop_tokens(folder, tokenizer)]
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: Path, folder: Path, from_ref: str | None = None,
                    overwrite: bool = False) -> Path:
    """`<gguf stem>.Modelfile` beside `gguf_path`. A model GGUF is its own FROM; an adapter
    GGUF (from_ref given: the base model) is the ADAPTER."""
    from loratune.files import write_atomic_file

    out = gguf_path.with_suffix(".Modelfile")
    local = f"./{gguf_path.name}"
    text = (modelfile_text(folder, from_ref, adapter=local) if from_ref
            else modelfile_text(folder, local))
    return write_atomic_file(out, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite)
