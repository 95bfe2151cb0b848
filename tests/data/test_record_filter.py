"""data.filter as an expression on a record's columns (data/record_filter.py) or user code."""

import ast
import builtins
import json

import pytest

from loratune.config import DataConfig, RunConfig
from loratune.data import DataError, build_examples
from loratune.data.record_filter import load_filter

ROWS = [{"instruction": "Say hi", "output": "hello there friend", "lang": "en"},
        {"instruction": "Say hi", "output": "hi", "lang": "en"},
        {"instruction": "Dis bonjour", "output": "bonjour mon ami", "lang": "fr"},
        {"instruction": "Say bye", "output": "Goodbye, see you", "lang": "en"}]


@pytest.fixture
def rows_file(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def test_expression_keeps_the_records_it_is_true_for(rows_file, smol_tokenizer):
    text = 'len(output) > 10 and lang == "en"'
    kept, stats = build_examples(rows_file, smol_tokenizer, DataConfig(filter=text))
    alone, _ = build_examples(rows_file, smol_tokenizer, DataConfig())
    assert [e.input_ids for e in kept] == [alone[0].input_ids, alone[3].input_ids]
    assert stats.notes == {f"left out by data.filter {text}": 2}


@pytest.mark.parametrize("text, expected", [
    ('lang in ["en", "de"] and not startswith(output, "hi")', [True, False, False, True]),
    ("words(output) >= 3", [True, False, True, True]),
    ('lower(output)[:4] == "good"', [False, False, False, True]),
    ("2 < len(output) // 2 <= 8", [False, False, True, True]),  # 18, 2, 15, 16 chars
    ('(len(output) if lang == "fr" else 0) % 5 == 0', [True, True, True, True]),
    ('lang == "fr" or nosuch > 1', [None, None, True, None]),  # en rows reach `nosuch`
    ('lang != "en" and nosuch > 1', [False, False, None, False]),  # short-circuits
    ('-len(output) < -15 or endswith(strip(output), "friend")', [True, False, False, True]),
])
def test_expression_values(text, expected):
    keep = load_filter(text)
    for row, want in zip(ROWS, expected):
        if want is None:
            with pytest.raises(DataError, match="no column 'nosuch' in this record; its "
                               "columns: instruction, output, lang"):
                keep(row)
        else:
            assert keep(row) is want, row


@pytest.mark.parametrize("text, part", [
    ('output.lower() == "x"', "attribute access 'output.lower' is not allowed"),
    ('__import__("os").system("true")', "attribute access .__import__..os..\\.system"),
    ('open("/etc/passwd")', "call .open\\('/etc/passwd'\\). is not allowed"),
    ('__import__("os")', "call .__import__\\('os'\\). is not allowed"),
    ("len(*output)", "call 'len\\(\\*output\\)' is not allowed"),
    ("[c for c in output]", "ListComprehension|ListComp"),
    ("(lambda: 1)()", "call .* is not allowed|Lambda"),
    ("output ** 2 > 1", "Pow"),
    ("{1: 2}", "Dict"),
    ("len(output) >", "neither path/to/file.py:function nor a valid expression"),
    ("keep.short", "attribute access 'keep.short'"),
])
def test_bad_expressions_name_the_part(text, part):
    with pytest.raises(DataError, match=f"data.filter {text!r}: ".replace("(", "\\(")
                       .replace(")", "\\)").replace("*", "\\*").replace("[", "\\[")
                       .replace("]", "\\]").replace("{", "\\{").replace("}", "\\}")
                       + f".*({part})"):
        load_filter(text)


def test_runtime_errors_name_the_record_and_part(rows_file, smol_tokenizer):
    with pytest.raises(DataError, match=r"t.jsonl:1: data.filter .*'output \* 2' failed: "
                       "TypeError: \\* multiplies numbers only"):
        build_examples(rows_file, smol_tokenizer, DataConfig(filter="len(output * 2) > 1"))
    with pytest.raises(DataError, match=r"t.jsonl:1: data.filter .* no column 'langue'"):
        build_examples(rows_file, smol_tokenizer, DataConfig(filter='langue == "en"'))
    with pytest.raises(DataError, match=r"t.jsonl:1: data.filter len\(output\) returned int"):
        build_examples(rows_file, smol_tokenizer, DataConfig(filter="len(output)"))


def test_no_eval_exec_or_code_compile_runs(monkeypatch):
    """Only ast.parse's compile (to a tree, PyCF_ONLY_AST) may run; no code object is made."""
    real_compile = builtins.compile

    def tree_only(source, filename, mode, flags=0, *args, **kw):
        if not flags & ast.PyCF_ONLY_AST:
            raise AssertionError("compile to code called")
        return real_compile(source, filename, mode, flags, *args, **kw)

    def refuse(*a, **k):
        raise AssertionError("eval/exec called")

    with monkeypatch.context() as patch:
        patch.setattr(builtins, "compile", tree_only)
        patch.setattr(builtins, "eval", refuse)
        patch.setattr(builtins, "exec", refuse)
        keep = load_filter('len(output) > 3 and lang == "en"')
        verdicts = [keep(r) for r in ROWS]
    assert verdicts == [True, False, False, True]


def test_file_references_use_the_shared_loader(tmp_path):
    with pytest.raises(DataError, match="data.filter file nowhere.py: not found"):
        load_filter("nowhere.py:keep")
    code = tmp_path / "k.py"
    code.write_text("def keep(record):\n    return record['lang'] == 'fr'\n")
    with pytest.raises(DataError, match=f"data.filter '{code}:nope': {code} has no function"):
        load_filter(f"{code}:nope")
    assert [load_filter(f"{code}:keep")(r) for r in ROWS] == [False, False, True, False]


def test_dashboard_checks_filter_files_not_expressions(tmp_path):
    from loratune.ui.confine import Confinement

    offered = Confinement.of(tmp_path / "runs", [tmp_path / "data"])
    (tmp_path / "data").mkdir()

    def run(text):
        return RunConfig.model_validate({"data": {"filter": text}})

    assert offered.refusal(run('len(output) > 10 and lang == "en"')) is None
    key, why = offered.refusal(run("/elsewhere/k.py:keep"))
    assert key == "data.filter" and "outside the folders" in why
