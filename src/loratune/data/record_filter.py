"""data.filter: which records to keep, as `path/to/file.py:function` (user code, called with
each record) or as an expression on a record's columns, e.g. `len(output) > 10 and lang == "en"`.

An expression is parsed with `ast` and run by the small interpreter below, never by `eval`: it
may hold only
- column names (a record's fields after data.columns), constants (strings, numbers, True,
  False, None), lists and tuples of them;
- `and`, `or`, `not`, `x if c else y`; comparisons `== != < <= > >= in not in is is not`;
  `+ - / // %` and `*` on numbers (no string or list repetition); `-x`; indexing and slicing
  (`messages[0]`, `output[:20]`);
- calls of the functions in FUNCTIONS, with plain arguments.
Attribute access (`output.lower()`: write `lower(output)`), other calls, comprehensions,
lambdas and the rest are refused when the config is read, naming the part.
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Callable

from loratune.data.errors import DataError
from loratune.user_code import load_function

FUNCTION_REF = re.compile(r".+\.py:[A-Za-z_]\w*")

# name -> function: string methods as functions, since attribute access is refused
FUNCTIONS: dict[str, Callable] = {
    "len": len, "str": str, "int": int, "float": float, "bool": bool, "abs": abs,
    "min": min, "max": max, "round": round,
    "lower": str.lower, "upper": str.upper, "strip": str.strip,
    "startswith": str.startswith, "endswith": str.endswith,
    "words": lambda text: len(str(text).split()),  # word count
}
COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt,
           ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
           ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b,
           ast.Is: operator.is_, ast.IsNot: operator.is_not}
ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
              ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}
UNARY = {ast.Not: operator.not_, ast.USub: operator.neg, ast.UAdd: operator.pos}
ALLOWED = (ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.BinOp, ast.Compare,
           ast.IfExp, ast.Call, ast.Name, ast.Load, ast.Constant, ast.List, ast.Tuple,
           ast.Subscript, ast.Slice, *COMPARE, *ARITHMETIC, *UNARY)


def load_filter(ref: str) -> Callable[[dict], bool]:
    """data.filter as a function of a record: user code for `file.py:function`, else the
    expression, checked now."""
    if FUNCTION_REF.fullmatch(ref.strip()):
        return load_function(ref.strip(), "data.filter", DataError)
    tree = parse_expression(ref)
    return lambda record: _value(tree.body, record, ref)


def parse_expression(text: str) -> ast.Expression:
    """The expression's tree, every node of it allowed, else a DataError naming the part."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as err:
        raise DataError(f"data.filter {text!r}: neither path/to/file.py:function nor a valid "
                        f"expression ({err.msg} at column {err.offset})") from None
    # attribute access first: `x.lower()` is refused for the attribute, not as a call
    for node in sorted(ast.walk(tree), key=lambda n: not isinstance(n, ast.Attribute)):
        why = _refusal(node)
        if why:
            raise DataError(f"data.filter {text!r}: {why}")
    return tree


def _refusal(node: ast.AST) -> str | None:
    part = ast.unparse(node) if not isinstance(node, ast.expr_context) else ""
    if isinstance(node, ast.Attribute):
        return (f"attribute access {part!r} is not allowed; call a function instead "
                f"(e.g. lower(x), not x.lower()): {', '.join(FUNCTIONS)}")
    if not isinstance(node, ALLOWED):
        return f"{part!r} ({type(node).__name__}) is not allowed in a filter expression"
    if isinstance(node, ast.Call):
        name = node.func.id if isinstance(node.func, ast.Name) else None
        if name not in FUNCTIONS or node.keywords or any(
                isinstance(a, ast.Starred) for a in node.args):
            return (f"call {part!r} is not allowed; the functions are "
                    f"{', '.join(FUNCTIONS)}, with plain arguments")
    return None


def _value(node: ast.expr, record: dict, text: str):
    """The value of `node` for `record` (a DataError names the part that failed)."""
    try:
        return _evaluate(node, record, text)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - len(5), "a" < 1, 1 / 0 ...
        raise DataError(f"data.filter {text!r}: {ast.unparse(node)!r} failed: "
                        f"{type(err).__name__}: {err}") from None


def _evaluate(node: ast.expr, record: dict, text: str):
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return _column(node.id, record, text)
    if isinstance(node, ast.BoolOp):
        return _bool_op(node, record, text)
    if isinstance(node, ast.Compare):
        return _compare(node, record, text)
    if isinstance(node, ast.IfExp):
        branch = node.body if _value(node.test, record, text) else node.orelse
        return _value(branch, record, text)
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_value(e, record, text) for e in node.elts]
    return _operation(node, record, text)


def _operation(node: ast.expr, record: dict, text: str):
    """Calls, arithmetic, unary operators and indexing."""
    if isinstance(node, ast.Call):
        return FUNCTIONS[node.func.id](*(_value(a, record, text) for a in node.args))
    if isinstance(node, ast.UnaryOp):
        return UNARY[type(node.op)](_value(node.operand, record, text))
    if isinstance(node, ast.BinOp):
        left, right = _value(node.left, record, text), _value(node.right, record, text)
        if isinstance(node.op, ast.Mult) and not all(
                isinstance(v, (int, float)) for v in (left, right)):
            raise TypeError("* multiplies numbers only (no string or list repetition)")
        return ARITHMETIC[type(node.op)](left, right)
    if isinstance(node, ast.Slice):
        return slice(*(None if p is None else _value(p, record, text)
                       for p in (node.lower, node.upper, node.step)))
    return _value(node.value, record, text)[_value(node.slice, record, text)]  # Subscript


def _column(name: str, record: dict, text: str):
    if name not in record:
        raise DataError(f"data.filter {text!r}: no column {name!r} in this record; its "
                        f"columns: {', '.join(record)}")
    return record[name]


def _bool_op(node: ast.BoolOp, record: dict, text: str):
    value = None
    for part in node.values:  # short-circuits as Python does
        value = _value(part, record, text)
        if bool(value) == isinstance(node.op, ast.Or):
            return value
    return value


def _compare(node: ast.Compare, record: dict, text: str) -> bool:
    left = _value(node.left, record, text)
    for op, right_node in zip(node.ops, node.comparators):
        right = _value(right_node, record, text)
        if not COMPARE[type(op)](left, right):
            return False
        left = right
    return True
