"""Scoring tool calls against a reference turn: the name, the arguments, and BFCL's AST check.

A call is `(name, arguments dict)`. Per turn:
- names: the called names equal the reference's (as a multiset: parallel calls in any order);
- exact: the calls equal the reference's after JSON normalisation (keys sorted), in any order;
- ast: as the Berkeley Function Calling Leaderboard's simple/parallel categories check a call
  (its `ast_checker`): a declared function, every required parameter given, no parameter that
  is not declared or not in the reference, each value of its schema's type (an integer is a
  valid `number`, a bool is no integer), and equal to the reference's value; strings compare
  standardised (lower case, without spaces and ,./-_*^ as BFCL does), numbers by value.
A turn whose reference makes no call is right when the model makes none.
"""

from __future__ import annotations

import json
import re

Call = tuple[str, dict]

# JSON schema type -> the Python types a value may have (bool is an int in Python: excluded)
_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
          "array": (list, tuple), "object": (dict,), "dict": (dict,)}
_STRIP = re.compile(r"[ ,./\-_*^]")


def calls_of(message: dict) -> list[Call]:
    """The (name, arguments) of an assistant message's tool_calls (arguments a dict or JSON)."""
    out = []
    for call in message.get("tool_calls") or []:
        args = call["function"]["arguments"]
        out.append((call["function"]["name"], json.loads(args) if isinstance(args, str) else args))
    return out


def names_match(pred: list[Call], ref: list[Call]) -> bool:
    return sorted(n for n, _ in pred) == sorted(n for n, _ in ref)


def _normal(call: Call) -> str:
    return json.dumps([call[0], call[1]], sort_keys=True, ensure_ascii=False)


def exact_match(pred: list[Call], ref: list[Call]) -> bool:
    return sorted(map(_normal, pred)) == sorted(map(_normal, ref))


def _type_ok(value, schema: dict) -> bool:
    kind = schema.get("type")
    types = _TYPES.get(kind) if isinstance(kind, str) else None
    if types is None:  # no type, a list of types, or one we do not know: not checked
        return True
    if isinstance(value, bool) and bool not in types:
        return False
    if not isinstance(value, types):
        return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    items = schema.get("items")
    return not (isinstance(value, (list, tuple)) and isinstance(items, dict)) or \
        all(_type_ok(v, items) for v in value)


def _same(value, ref) -> bool:
    """BFCL's value comparison: strings standardised, numbers by value, lists and dicts deep."""
    if isinstance(value, str) and isinstance(ref, str):
        return _STRIP.sub("", value.lower()) == _STRIP.sub("", ref.lower())
    if isinstance(value, (list, tuple)) and isinstance(ref, (list, tuple)):
        return len(value) == len(ref) and all(_same(v, r) for v, r in zip(value, ref))
    if isinstance(value, dict) and isinstance(ref, dict):
        return value.keys() == ref.keys() and all(_same(value[k], ref[k]) for k in ref)
    if isinstance(value, bool) or isinstance(ref, bool):
        return value is ref
    return value == ref


def ast_call_match(pred: Call, ref: Call, schemas: dict[str, dict]) -> bool:
    """One predicted call against one reference call, under the declared `schemas`."""
    (name, args), (ref_name, ref_args) = pred, ref
    if name != ref_name or name not in schemas:
        return False
    params = schemas[name].get("parameters") or {}
    props = params.get("properties") or {}
    if any(r not in args for r in params.get("required") or []):
        return False
    if args.keys() != ref_args.keys() or any(k not in props for k in args):
        return False
    return all(_type_ok(v, props[k]) and _same(v, ref_args[k]) for k, v in args.items())


def ast_match(pred: list[Call], ref: list[Call], schemas: dict[str, dict]) -> bool:
    """Every reference call matched by a distinct predicted call (parallel calls: any order)."""
    if len(pred) != len(ref):
        return False
    left = list(pred)
    for r in ref:
        hit = next((p for p in left if ast_call_match(p, r, schemas)), None)
        if hit is None:
            return False
        left.remove(hit)
    return True


def schemas_of(tools: list[dict]) -> dict[str, dict]:
    """name -> function schema of OpenAI tool entries (data/tools.read_tools' output)."""
    return {t["function"]["name"]: t["function"] for t in tools}
