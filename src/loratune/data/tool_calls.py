"""Read tool calls out of generated text, in the format the family's chat template teaches.

- hermes (Qwen2.5/Qwen3): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one
  block per call, text before them is content;
- llama3_json (Llama 3.1/3.2): the whole answer is `{"name": ..., "parameters": {...}}`
  (optionally after `<|python_tag|>`);
- mistral (Mistral v0.3): `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`;
- phi4 (Phi-4-mini): `<|tool_call|>[{"name": ..., "arguments": {...}}]<|/tool_call|>`.
Text that does not parse as a call of a declared tool stays content (a model may just talk).
The engine decodes without special tokens, so Mistral's `[TOOL_CALLS]` and Phi-4-mini's
`<|tool_call|>` may be gone: a whole answer that is a JSON list of calls is read as calls too.
"""

from __future__ import annotations

import json
import uuid

PARSERS = ("hermes", "llama3_json", "mistral", "phi4")
TAGS = {"hermes": ("<tool_call>", "</tool_call>"), "phi4": ("<|tool_call|>", "<|/tool_call|>")}


def parser_for_template(template: str | None) -> str | None:
    """The parser a chat template's own call format needs; None when it shows none."""
    template = template or ""
    for marker, name in (("<tool_call>", "hermes"), ("[TOOL_CALLS]", "mistral"),
                         ('"parameters": ', "llama3_json"), ("'tools' in message", "phi4")):
        if marker in template:
            return name
    return None


def _loads(text: str):
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):   # "[[[[..." deep: talk, not a call
        return None


def _call(obj, names: set[str]) -> dict | None:
    """An OpenAI tool_calls entry for a parsed {"name", "arguments"|"parameters"}, or None."""
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    args = _loads(args) if isinstance(args, str) else args
    if not isinstance(args, dict):
        return None
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


def _calls(objs: list, names: set[str]) -> list[dict] | None:
    calls = [_call(o, names) for o in objs]
    return None if not calls or any(c is None for c in calls) else calls


def _blocks(text: str, open_tag: str, close_tag: str) -> tuple[int, list[str]]:
    """(where the first block starts, each block's inside) of `open_tag ... close_tag` blocks.
    str.find, not a lazy regex: an answer of thousands of open tags and no close tag (a user
    can ask for one) made the regex scan to the end from each tag, seconds of quadratic time."""
    first, blocks, at = -1, [], 0
    while (start := text.find(open_tag, at)) != -1:
        end = text.find(close_tag, start + len(open_tag))
        if end == -1:
            break
        first = start if first == -1 else first
        blocks.append(text[start + len(open_tag):end].strip())
        at = end + len(close_tag)
    return first, blocks


def parse_tool_calls(text: str, parser: str, names: set[str]) -> tuple[str, list[dict]]:
    """(content, tool_calls) of a generated answer; (text, []) when it makes no valid call."""
    if parser == "hermes" or parser == "phi4":
        first, blocks = _blocks(text, *TAGS[parser])
        objs = [_loads(b) for b in blocks]
        if parser == "phi4" and len(objs) == 1 and isinstance(objs[0], list):
            objs = objs[0]
        if not blocks and parser == "phi4":  # <|tool_call|> decoded away
            objs = _loads(text.strip())
            objs = objs if isinstance(objs, list) else None
        calls = _calls(objs or [], names) if blocks or objs else None
        content = text[:first].strip() if blocks else ""
        return (content, calls) if calls else (text, [])
    if parser == "llama3_json":
        obj = _loads(text.removeprefix("<|python_tag|>").strip())
        calls = _calls(obj if isinstance(obj, list) else [obj], names)
        return ("", calls) if calls else (text, [])
    if parser == "mistral":
        head, sep, tail = text.partition("[TOOL_CALLS]")
        head, tail = (head, tail) if sep else ("", text)
        obj = _loads(tail.strip())
        calls = _calls(obj if isinstance(obj, list) else [obj], names)
        return (head.strip(), calls) if calls else (text, [])
    raise ValueError(f"unknown tool parser '{parser}'; expected one of {', '.join(PARSERS)}")
