"""Tool-use conversations: read them, check them, and fit them to a family's chat template.

Two layouts are read:
- OpenAI: a top-level `tools` list (JSON schemas), assistant messages with `tool_calls`
  (`{"id", "type": "function", "function": {"name", "arguments"}}`, arguments a JSON object or
  its text) and `tool` messages answering a call by `tool_call_id` (or, without one, the
  oldest call still unanswered).
- ShareGPT as LLaMA-Factory writes it: `function_call` turns (one call `{"name", "arguments"}`
  or a list of them, as JSON text) and `observation` turns, with a `tools` column (JSON text).

Both become OpenAI-style messages with arguments parsed to dicts (what every template's
`tojson` expects) and call ids renumbered `call00001`, ... (Mistral v0.3's template refuses ids
that are not 9 alphanumeric characters). Tool calls are answers (they carry loss); tool results
are context.
"""

from __future__ import annotations

import json
import math

from loratune.data.errors import DataError

SHAREGPT_TOOL_ROLES = {"function_call": "tool_calls", "observation": "tool"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "function_call": "assistant", "observation": "tool"}
ROLES = ("system", "user", "assistant", "tool")


def has_tools(record: dict) -> bool:
    """Whether a record is a tool-use conversation (a `tools` field, a call or a result)."""
    if record.get("tools") not in (None, "", []):
        return True
    turns = record.get("messages") or record.get("conversations")
    if not isinstance(turns, list):
        return False
    return any(isinstance(t, dict) and (t.get("role") == "tool" or t.get("tool_calls")
                                        or t.get("from") in SHAREGPT_TOOL_ROLES) for t in turns)


def _json(value, field: str, where: str):
    """A field that may hold JSON text (CSV cells, LLaMA-Factory's columns) or the value."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: {field} is not valid JSON ({err.msg} at column "
                        f"{err.colno})") from None
    except RecursionError:   # "[[[[..." 100k deep: a request or data row, not our stack
        raise DataError(f"{where}: {field} nests arrays or objects too deeply to be read "
                        "as JSON") from None


def read_tools(value, where: str) -> list[dict]:
    """The `tools` field as OpenAI tool entries ({"type": "function", "function": {...}});
    bare function schemas ({"name", "description", "parameters"}) are wrapped."""
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return []
    tools = _json(value, "field 'tools'", where)
    if not isinstance(tools, list):
        raise DataError(f"{where}: field 'tools' must be a list of function schemas, got "
                        f"{type(tools).__name__}")
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise DataError(f"{where}: tools[{i}] must be a function schema with a 'name' "
                            "(OpenAI's {\"type\": \"function\", \"function\": {...}} or bare)")
        out.append({"type": "function", "function": fn})
    return out


def _content(value, field: str, where: str) -> str:
    if value is None:
        return ""
    if isinstance(value, (dict, list)):  # a structured tool result: keep it as JSON text
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise DataError(f"{where}: field '{field}' must be text, got {type(value).__name__}")


class _Calls:
    """Call ids as they are made and answered, to renumber them and catch orphan results."""

    def __init__(self, names: set[str], where: str) -> None:
        self.names, self.where = names, where
        self.pending: dict[str, tuple[str, str]] = {}  # given id -> (new id, tool name)
        self.made = 0

    def call(self, raw, field: str) -> dict:
        fn = raw.get("function", raw) if isinstance(raw, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise DataError(f"{self.where}: {field} must be a call with a function 'name'")
        name = fn["name"]
        if name not in self.names:
            known = ", ".join(sorted(self.names)) or "none declared"
            raise DataError(f"{self.where}: {field} calls '{name}', which is not in tools "
                            f"({known})")
        args = _json(fn.get("arguments", {}), f"{field}.arguments", self.where)
        if not isinstance(args, dict):
            raise DataError(f"{self.where}: {field}.arguments must be a JSON object, got "
                            f"{type(args).__name__}")
        self.made += 1
        new = f"call{self.made:05d}"
        given = raw.get("id") if isinstance(raw.get("id"), str) and raw.get("id") else new
        self.pending[given] = (new, name)
        return {"id": new, "type": "function", "function": {"name": name, "arguments": args}}

    def answer(self, given: str | None, field: str) -> tuple[str, str]:
        """(new id, tool name) of the call a result answers; no such call is an error."""
        if given is None and self.pending:
            given = next(iter(self.pending))
        if given not in self.pending:
            what = f"tool_call_id '{given}'" if given else "a result"
            raise DataError(f"{self.where}: {field} answers no call ({what} matches no "
                            "unanswered tool call before it)")
        return self.pending.pop(given)


def _turn_kind(turn, key: str, allowed, field: str, where: str) -> str:
    """The turn's role (`key`: OpenAI's "role", ShareGPT's "from"), one of `allowed`."""
    if not isinstance(turn, dict) or turn.get(key) not in allowed:
        got = turn.get(key) if isinstance(turn, dict) else type(turn).__name__
        raise DataError(f"{where}: {field}.{key} is {got!r}; expected one of "
                        f"{', '.join(allowed)}")
    return turn[key]


def _openai_turn(turn, i: int, calls: _Calls, where: str) -> dict:
    field = f"messages[{i}]"
    role = _turn_kind(turn, "role", ROLES, field, where)
    message = {"role": role, "content": _content(turn.get("content"), f"{field}.content", where)}
    if role == "assistant" and turn.get("tool_calls"):
        raw = _json(turn["tool_calls"], f"{field}.tool_calls", where)
        if not isinstance(raw, list):
            raise DataError(f"{where}: {field}.tool_calls must be a list")
        message["tool_calls"] = [calls.call(c, f"{field}.tool_calls[{j}]")
                                 for j, c in enumerate(raw)]
    elif role == "tool":
        message["tool_call_id"], message["name"] = calls.answer(turn.get("tool_call_id"), field)
    return message


def _sharegpt_turn(turn, i: int, calls: _Calls, where: str) -> dict:
    field = f"conversations[{i}]"
    kind = _turn_kind(turn, "from", SHAREGPT_ROLES, field, where)
    if kind == "function_call":
        raw = _json(turn.get("value"), f"{field}.value", where)
        raw = raw if isinstance(raw, list) else [raw]
        return {"role": "assistant", "content": "",
                "tool_calls": [calls.call(c, f"{field}.value") for c in raw]}
    content = _content(turn.get("value"), f"{field}.value", where)
    if kind == "observation":
        new, name = calls.answer(None, field)
        return {"role": "tool", "tool_call_id": new, "name": name, "content": content}
    return {"role": SHAREGPT_ROLES[kind], "content": content}


def tool_conversation(record: dict, fmt: str, where: str,
                      answer_last: bool = True) -> tuple[list[dict], list[dict]]:
    """(messages, tools) of a tool-use record in the `messages` or `sharegpt` format; a
    prompt (answer_last=False, as a server gets) may end with a user turn or a tool result."""
    tools = read_tools(record.get("tools"), where)
    calls = _Calls({t["function"]["name"] for t in tools}, where)
    key, turn = ("messages", _openai_turn) if fmt == "messages" else \
        ("conversations", _sharegpt_turn)
    if fmt not in ("messages", "sharegpt"):
        raise DataError(f"{where}: tool calls need the messages or sharegpt format, not {fmt}")
    turns = _json(record.get(key), f"field '{key}'", where)
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field '{key}' must be a non-empty list")
    messages = [turn(t, i, calls, where) for i, t in enumerate(turns)]
    if answer_last and messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the conversation must end with an assistant turn, "
                        f"not '{messages[-1]['role']}'")
    return messages, tools


# -- fitting a conversation to the family's template --------------------------------------------
# Templates with native tool support take `tools=` and render `tool_calls` and `tool` messages
# themselves (Llama 3.1/3.2, Qwen2.5/Qwen3, Mistral v0.3). Phi-4-mini's reads the schemas from
# the system message's `tools` field and writes calls as text: <|tool_call|>[...]<|/tool_call|>
# in the answer, results in a <|tool_response|> turn (its special tokens).
PHI4_CALL = ("<|tool_call|>", "<|/tool_call|>")


def tool_dialect(template: str) -> str | None:
    """'native', 'phi4' or None (the template cannot render tools)."""
    if "tool_calls" in template:
        return "native"
    if "'tools' in message" in template or '"tools" in message' in template:
        return "phi4"
    return None


def _phi4(messages: list[dict], tools: list[dict]) -> list[dict]:
    schemas = json.dumps([t["function"] for t in tools], ensure_ascii=False)
    out = [dict(m) for m in messages]
    if out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": ""})
    out[0]["tools"] = schemas
    for m in out:
        if m.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                     for c in m.pop("tool_calls")]
            m["content"] += PHI4_CALL[0] + json.dumps(calls, ensure_ascii=False) + PHI4_CALL[1]
        elif m["role"] == "tool":
            m["role"] = "tool_response"
    return [{k: v for k, v in m.items() if k not in ("tool_call_id", "name")} for m in out]


def template_name(tokenizer, configured: str | None = None) -> str:
    """How an error names the chat template: data.template's name, else the tokenizer's own."""
    return configured or f"{getattr(tokenizer, 'name_or_path', '') or 'the tokenizer'}'s own"


def fit_tools(messages: list[dict], tools: list[dict], template: str,
              template_name: str) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools to pass to the template) for a tool-use conversation; a template
    without tool support is a DataError naming it."""
    dialect = tool_dialect(template)
    if dialect is None:
        raise DataError(f"the chat template ({template_name}) has no tool support: it renders "
                        "neither tool_calls nor tools; use a model whose template does (Llama "
                        "3.1/3.2, Qwen2.5/Qwen3, Mistral v0.3, Phi-4-mini) or drop the tool "
                        "conversations")
    if dialect == "phi4":
        return _phi4(messages, tools), None
    return messages, tools or None
