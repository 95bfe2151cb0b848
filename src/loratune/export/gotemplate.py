"""A small renderer for the subset of Go's text/template that Ollama chat templates use.

Ollama renders a model's TEMPLATE with Go's text/template. To know which template reproduces
a model's Jinja chat template, the Modelfile writer renders candidates here on sample
conversations and compares. Supported: `{{- x -}}` whitespace trimming, `if` / `else if` /
`else` / `end`, `range pipe` and `range [$i,] $v := pipe`, `$x := pipe` and `$x = pipe`, fields
(`.Role`, `$.System`, `$m.Content`), string and integer literals, parentheses and the functions
`eq`, `ne`, `and`, `or`, `not`, `len`, `slice` and Ollama's `json`. Anything else is a ValueError
naming it.

Data is dicts. A field `.Name` reads the key `Name`, else `name`: Ollama's structs (api.Tool,
api.ToolCall) marshal under their lower-case JSON names, so a tool kept in its JSON form is both
what `json` writes and what `.Function.Name` reads.
"""

from __future__ import annotations

import json
import re

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(r'\s*(\(|\)|"(?:[^"\\]|\\.)*"|[^\s()]+)')


def _lex(template: str) -> list[tuple[str, str]]:
    """[('text', s) | ('action', body)] with Go's trim markers applied to the texts."""
    out: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        if trim_next:
            text = text.lstrip(" \t\r\n")
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        out.append(("text", text))
        out.append(("action", m.group(2).strip()))
        trim_next, pos = bool(m.group(3)), m.end()
    text = template[pos:]
    out.append(("text", text.lstrip(" \t\r\n") if trim_next else text))
    return out


def _parse(items: list[tuple[str, str]], i: int, stop: tuple[str, ...]):
    """Nodes until an action starting with one of `stop`; returns (nodes, index, stop action)."""
    nodes = []
    while i < len(items):
        kind, body = items[i]
        if kind == "text":
            nodes.append(("text", body))
            i += 1
            continue
        word = body.split(" ", 1)[0]
        if word in ("end", "else"):
            if word not in stop:
                raise ValueError(f"unexpected {{{{{body}}}}}")
            return nodes, i, body
        if word == "if":
            branches = []
            cond = body[3:]
            while True:
                inner, i, end = _parse(items, i + 1, ("else", "end"))
                branches.append((cond, inner))
                if end == "end":
                    break
                cond = end[8:] if end.startswith("else if ") else "true"
            nodes.append(("if", branches))
            i += 1
        elif word == "range":
            m = re.fullmatch(r"range\s+(?:(?:(\$\w+)\s*,\s*)?(\$\w+)\s*:=\s*)?(.+)", body)
            if not m:
                raise ValueError(f"unsupported range: {{{{{body}}}}}")
            inner, i, _ = _parse(items, i + 1, ("end",))
            nodes.append(("range", m.group(1), m.group(2), m.group(3), inner))
            i += 1
        else:
            nodes.append(("action", body))
            i += 1
    if stop:
        raise ValueError(f"template ends inside a block (expected {stop[-1]})")
    return nodes, i, None


def _tokens(expr: str) -> list[str]:
    return _TOKEN.findall(expr)


def _truthy(v) -> bool:
    return bool(v)


def _field(obj, name: str):
    if isinstance(obj, dict):
        return obj[name] if name in obj else obj.get(name[:1].lower() + name[1:])
    raise ValueError(f"no field {name} on {type(obj).__name__}")


class _Eval:
    def __init__(self, root):
        self.root = root
        self.vars: dict[str, object] = {"$": root}

    def operand(self, tok: str, dot):
        if tok.startswith('"'):
            return bytes(tok[1:-1], "utf-8").decode("unicode_escape")
        if re.fullmatch(r"-?\d+", tok):
            return int(tok)
        if tok == "true":
            return True
        if tok == "false":
            return False
        if tok.startswith("$"):
            head, *fields = tok.split(".")
            if head not in self.vars:
                raise ValueError(f"undefined variable {head}")
            value = self.vars[head]
        elif tok.startswith("."):
            value, fields = dot, tok.split(".")[1:]
            fields = [f for f in fields if f]
        else:
            raise ValueError(f"unsupported operand {tok!r}")
        for f in fields:
            value = _field(value, f)
        return value

    def pipe(self, toks: list[str], dot):
        args, k = [], 0
        while k < len(toks):
            if toks[k] == "(":
                depth, j = 1, k + 1
                while depth:
                    depth += {"(": 1, ")": -1}.get(toks[j], 0)
                    j += 1
                args.append(("value", self.pipe(toks[k + 1:j - 1], dot)))
                k = j
            else:
                args.append(("tok", toks[k]))
                k += 1
        head = args[0]
        if head[0] == "tok" and head[1] in _FUNCS:
            values = [a[1] if a[0] == "value" else self.operand(a[1], dot) for a in args[1:]]
            return _FUNCS[head[1]](*values)
        if len(args) != 1:
            raise ValueError(f"unsupported expression: {' '.join(toks)}")
        return head[1] if head[0] == "value" else self.operand(head[1], dot)

    def run(self, nodes, dot, out: list[str]) -> None:
        for node in nodes:
            kind = node[0]
            if kind == "text":
                out.append(node[1])
            elif kind == "action":
                body = node[1]
                m = re.fullmatch(r"(\$\w+)\s*(:?=)\s*(.+)", body)
                if m:
                    self.vars[m.group(1)] = self.pipe(_tokens(m.group(3)), dot)
                else:
                    out.append(_print(self.pipe(_tokens(body), dot)))
            elif kind == "if":
                for cond, inner in node[1]:
                    if cond == "true" or _truthy(self.pipe(_tokens(cond), dot)):
                        self.run(inner, dot, out)
                        break
            elif kind == "range":
                _, index_var, item_var, expr, inner = node
                for i, item in enumerate(self.pipe(_tokens(expr), dot) or []):
                    if index_var:
                        self.vars[index_var] = i
                    if item_var:
                        self.vars[item_var] = item
                    self.run(inner, item, out)


def _print(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def go_json(value) -> str:
    """Ollama's `json` (Go's json.Marshal): compact, and <, >, & escaped as Go does for HTML.
    Keys in the order the value holds them: Ollama's data builder puts them in Go's order."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


_FUNCS = {
    "eq": lambda a, *bs: any(a == b for b in bs),
    "ne": lambda a, b: a != b,
    "and": lambda *xs: next((x for x in xs if not _truthy(x)), xs[-1]),
    "or": lambda *xs: next((x for x in xs if _truthy(x)), xs[-1]),
    "not": lambda x: not _truthy(x),
    "len": len,
    "slice": lambda x, *ix: x[ix[0]:ix[1]] if len(ix) == 2 else x[ix[0]:] if ix else x,
    "json": go_json,
}


def render(template: str, data: dict) -> str:
    """Render `template` with `data` as the root (`.`), as Go's text/template would."""
    nodes, _, _ = _parse(_lex(template), 0, ())
    out: list[str] = []
    _Eval(data).run(nodes, data, out)
    return "".join(out)
