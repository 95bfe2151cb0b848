"""Reading data files and turning records into messages: values, and errors that point."""

import json

import pandas as pd
import pytest

from loratune.config import DataConfig
from loratune.data import (
    DataError,
    detect_format,
    load_conversations,
    read_indexed,
    read_records,
    to_messages,
)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    return path


# ------------------------------------------------------------------------------ reading files


def test_jsonl_skips_blank_lines_and_keeps_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    # A byte-order mark, a blank line, CRLF endings, and a raw U+2028 inside a JSON string
    # (legal JSON; str.splitlines would cut the line there).
    text = ('\ufeff{"instruction": "a", "output": "b"}\r\n\r\n'
            '{"instruction": "x\u2028y", "output": "z"}\n   \n'
            '{"instruction": "c", "output": "d"}\n')
    path.write_text(text, encoding="utf-8")
    records = read_indexed(path)
    assert [n for n, _ in records] == [1, 3, 5]
    assert records[1][1]["instruction"] == "x\u2028y"
    assert read_records(path)[0] == {"instruction": "a", "output": "b"}


def test_jsonl_malformed_line_names_file_line_and_json_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "a", oops}\n')
    with pytest.raises(DataError) as err:
        read_records(path)
    assert str(err.value) == (f"{path}:3: malformed JSON: Expecting property name enclosed in "
                              "double quotes at column 22")
    path.write_text('{"instruction": "a", "output": "b"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: expected a JSON object, got list"):
        read_records(path)


def test_json_list_or_data_key(tmp_path):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]
    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "data.json").write_text(json.dumps({"data": rows, "version": 2}))
    assert read_records(tmp_path / "list.json") == rows
    assert read_indexed(tmp_path / "data.json") == [(0, rows[0]), (1, rows[1])]
    (tmp_path / "bad.json").write_text(json.dumps([rows[0], "text"]))
    with pytest.raises(DataError, match=r"bad\.json\[1\]: expected a JSON object, got str"):
        read_records(tmp_path / "bad.json")
    (tmp_path / "scalar.json").write_text("3")
    with pytest.raises(DataError, match=r"scalar\.json: expected a list of objects"):
        read_records(tmp_path / "scalar.json")
    (tmp_path / "broken.json").write_text('[\n  {"a": 1},\n  {"a": }\n]')
    with pytest.raises(DataError, match=r"broken\.json:3: malformed JSON: Expecting value"):
        read_records(tmp_path / "broken.json")


def test_csv_keeps_text_and_true_line_numbers(tmp_path):
    path = tmp_path / "d.csv"
    # Row 1 has a quoted cell over three lines, so row 2 starts on line 5, not line 3.
    path.write_text('instruction,input,output\n'
                    '"Write\ntwo\nlines",,007\n'
                    'Price?,,1.50\n'
                    'Missing,x,\n', encoding="utf-8")
    records = read_indexed(path)
    assert [n for n, _ in records] == [2, 5, 6]
    assert records[0][1] == {"instruction": "Write\ntwo\nlines", "input": "", "output": "007"}
    assert records[1][1]["output"] == "1.50"  # text, not the float 1.5
    with pytest.raises(DataError) as err:
        load_conversations(path, DataConfig())
    assert str(err.value) == f"{path}:6: field 'output' is empty"
    path.write_text("instruction,output\na,b,c\n")
    with pytest.raises(DataError, match=r"d\.csv:2: 1 more cells than the 2 header columns"):
        read_records(path)


def test_csv_column_holding_json_messages(tmp_path):
    path = tmp_path / "chat.csv"
    msgs = [{"role": "user", "content": "Hi, you"}, {"role": "assistant", "content": "Yo"}]
    pd.DataFrame([{"messages": json.dumps(msgs)}]).to_csv(path, index=False)
    assert load_conversations(path, DataConfig()) == [msgs]


def test_parquet_flat_and_nested_columns(tmp_path):
    flat = tmp_path / "alpaca.parquet"
    pd.DataFrame([{"instruction": "a", "input": "", "output": "b"},
                  {"instruction": "c", "input": "d", "output": None}]).to_parquet(flat)
    with pytest.raises(DataError, match=r"alpaca\.parquet\[1\]: missing required field 'output'"):
        load_conversations(flat, DataConfig())
    nested = tmp_path / "chat.parquet"
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"}]
    pd.DataFrame([{"messages": msgs, "id": 7}]).to_parquet(nested)
    # Nested columns come back as plain lists of dicts, not numpy arrays.
    assert read_records(nested) == [{"messages": msgs, "id": 7}]
    assert load_conversations(nested, DataConfig()) == [msgs]


@pytest.mark.parametrize("name,content", [
    ("e.jsonl", "\n \n"), ("e.json", "[]"), ("e.csv", "instruction,output\n"), ("e.parquet", None),
])
def test_empty_dataset_names_the_file(tmp_path, name, content):
    path = tmp_path / name
    if content is None:
        pd.DataFrame({"instruction": pd.Series([], dtype=str)}).to_parquet(path)
    else:
        path.write_text(content)
    with pytest.raises(DataError) as err:
        read_records(path)
    assert str(err.value) == f"{path}: the dataset is empty (no records)"


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(DataError, match=r"data file not found: .*nope\.jsonl"):
        read_records(tmp_path / "nope.jsonl")
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(DataError, match=r"d\.txt: unsupported file type '\.txt'; expected one of "
                                        r"\.jsonl, \.json, \.csv, \.parquet"):
        read_records(tmp_path / "d.txt")


# ----------------------------------------------------------------------------- record formats


def test_detect_format():
    assert detect_format({"instruction": "a", "output": "b"}) == "alpaca"
    assert detect_format({"messages": []}) == "messages"
    assert detect_format({"conversations": []}) == "sharegpt"
    with pytest.raises(DataError, match=r"d\.jsonl:4: cannot tell the format from keys "
                                        r"\['answer', 'question'\]"):
        detect_format({"question": "q", "answer": "a"}, "d.jsonl:4")


def test_alpaca_to_messages():
    record = {"system": "Be brief.", "history": [["hi", "hello"]], "instruction": "Add",
              "input": "2 and 3", "output": 5}
    assert to_messages(record, "alpaca") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "Add\n\n2 and 3"}, {"role": "assistant", "content": "5"},
    ]
    plain = {"instruction": "Say hi", "input": "", "output": "hi"}
    assert to_messages(plain, "auto", system_prompt="S") == [
        {"role": "system", "content": "S"}, {"role": "user", "content": "Say hi"},
        {"role": "assistant", "content": "hi"}]
    # The record's own system turn wins over data.system_prompt.
    assert to_messages(record, "alpaca", system_prompt="S")[0]["content"] == "Be brief."


@pytest.mark.parametrize("record,message", [
    ({"output": "b"}, "d.jsonl:7: missing required field 'instruction'"),
    ({"instruction": "a"}, "d.jsonl:7: missing required field 'output'"),
    ({"instruction": "a", "output": ["x"]}, "d.jsonl:7: field 'output' must be text, got list"),
    ({"instruction": "a", "output": "b", "history": [["only one"]]},
     "d.jsonl:7: history[0] must be a [user, assistant] pair"),
    ({"instruction": "a", "output": "b", "history": [["q", None]]},
     "d.jsonl:7: missing required field 'history[0][1]'"),
])
def test_alpaca_errors_name_line_and_field(record, message):
    with pytest.raises(DataError) as err:
        to_messages(record, "alpaca", 7, "d.jsonl")
    assert str(err.value) == message


def test_messages_and_sharegpt_to_messages():
    chat = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                      {"type": "text", "text": "b"}]},
                         {"role": "assistant", "content": "c", "weight": 1}]}
    assert to_messages(chat, "auto") == [{"role": "user", "content": "ab"},
                                         {"role": "assistant", "content": "c"}]
    share = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "q"},
                               {"from": "gpt", "value": "a"}, {"from": "user", "value": "q2"},
                               {"from": "assistant", "value": "a2"}]}
    assert [m["role"] for m in to_messages(share, "auto")] == [
        "system", "user", "assistant", "user", "assistant"]


@pytest.mark.parametrize("record,message", [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "x"}]},
     "d.json[3]: messages[1].role is 'tool'; expected one of system, user, assistant"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]},
     "d.json[3]: missing required field 'messages[0].content'"),
    ({"messages": [{"role": "user", "content": "q"}]},
     "d.json[3]: the conversation must end with an assistant turn, not 'user'"),
    ({"messages": []}, "d.json[3]: field 'messages' is an empty list"),
    ({"messages": "hello"}, "d.json[3]: field 'messages' is text but not a JSON list "
                            "(Expecting value)"),
    ({"conversations": [{"from": "bot", "value": "x"}]},
     "d.json[3]: conversations[0].from is 'bot'; expected one of system, human, user, gpt, "
     "assistant"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt"}]},
     "d.json[3]: missing required field 'conversations[1].value'"),
])
def test_chat_errors_name_record_and_field(record, message):
    with pytest.raises(DataError) as err:
        to_messages(record, "auto", 3, "d.json")
    assert str(err.value) == message


def test_load_conversations_reports_jsonl_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n\n{"instruction": "a"}\n')
    with pytest.raises(DataError) as err:
        load_conversations(path, DataConfig())
    assert str(err.value) == f"{path}:4: missing required field 'output'"
    # An explicit format is applied to every record, so a sharegpt line is reported as such.
    _jsonl(path, [{"conversations": [{"from": "human", "value": "q"},
                                     {"from": "gpt", "value": "a"}]}])
    with pytest.raises(DataError, match=r"d\.jsonl:1: missing required field 'instruction'"):
        load_conversations(path, DataConfig(format="alpaca"))
    assert load_conversations(path, DataConfig(format="sharegpt", system_prompt="S")) == [[
        {"role": "system", "content": "S"}, {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"}]]
