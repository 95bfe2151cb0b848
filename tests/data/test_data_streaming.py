"""A data file's first bad record is reported before the rest of the file is read.

Each file below has a bad record near its start, then 32 MB of good records, then bytes that
are not UTF-8: a reader that read the whole file first would report the bad bytes at the end
(or run out of memory on a big corpus) instead of the bad record."""

import json
import tracemalloc

import pytest

from loratune.config import DataConfig
from loratune.data import DataError, build_examples, load_conversations, read_records
from loratune.data.formats import read_indexed
from loratune.data.preference_pairs import build_preference_examples
from loratune.data.streaming import JsonStream, text_chunks

GOOD = json.dumps({"instruction": "a", "output": "b"}).encode()
PAIR = json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}).encode()
FILLER = 32 << 20


def _file(path, head: bytes, row: bytes, tail: bytes = b"\xff\xfe not text\n"):
    with path.open("wb") as f:
        f.write(head)
        f.write(row * (FILLER // len(row)))
        f.write(tail)
    return path


def _raises_early(read, path, message):
    """`read(path)` fails with `message`, having allocated far less than the file's size."""
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as err:
            read(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(err.value) == message
    assert peak < 8 << 20, f"{peak / 2**20:.0f} MB allocated to find a bad record at the start"


BAD_JSON = b'{"instruction": "a", oops}'
BAD_JSON_MSG = "malformed JSON: Expecting property name enclosed in double quotes at column 22"


def test_jsonl_malformed_line_2_is_reported_before_the_rest(tmp_path):
    path = _file(tmp_path / "d.jsonl", GOOD + b"\n" + BAD_JSON + b"\n", GOOD + b"\n")
    _raises_early(read_records, path, f"{path}:2: {BAD_JSON_MSG}")


def test_jsonl_record_missing_a_field_is_reported_before_the_rest(tmp_path, smol_tokenizer):
    path = _file(tmp_path / "d.jsonl", GOOD + b'\n{"instruction": "a"}\n', GOOD + b"\n")
    message = f"{path}:2: missing required field 'output'"
    _raises_early(lambda p: load_conversations(p, DataConfig()), path, message)
    _raises_early(lambda p: build_examples(p, smol_tokenizer, DataConfig()), path, message)


def test_json_array_malformed_element_is_reported_before_the_rest(tmp_path):
    path = _file(tmp_path / "d.json", b"[" + GOOD + b",\n" + BAD_JSON + b",\n", GOOD + b",\n",
                 b"\xff]")
    _raises_early(read_records, path, f"{path}:2: {BAD_JSON_MSG}")


def test_json_array_record_missing_a_field_is_reported_before_the_rest(tmp_path):
    path = _file(tmp_path / "d.json", b"[" + GOOD + b',\n{"instruction": "a"},\n',
                 GOOD + b",\n", b"\xff]")
    _raises_early(lambda p: load_conversations(p, DataConfig()), path,
                  f"{path}[1]: missing required field 'output'")


def test_csv_row_with_extra_cells_is_reported_before_the_rest(tmp_path):
    path = _file(tmp_path / "d.csv", b"instruction,output\na,b\na,b,c\n", b"a,b\n")
    _raises_early(read_records, path, f"{path}:3: 1 more cells than the 2 header columns")


def test_preference_record_without_rejected_is_reported_before_the_rest(tmp_path,
                                                                       smol_tokenizer):
    path = _file(tmp_path / "p.jsonl", PAIR + b'\n{"prompt": "q", "chosen": "a"}\n',
                 PAIR + b"\n")
    _raises_early(lambda p: build_preference_examples(p, smol_tokenizer, DataConfig(), "pairs"),
                  path, f"{path}:2: missing field 'rejected' (a preference pair needs 'chosen' and "
                        "'rejected')")


# ------------------------------------------------------------------- the JSON array parser


def _elements(path, size):
    stream = JsonStream(text_chunks(path, size), path)
    assert stream.next_char() == "["
    return list(stream.array())


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64])
def test_json_array_cut_anywhere_reads_the_same(tmp_path, size):
    # Values a read can stop inside: strings with escapes and multi-byte characters, numbers,
    # literals, nested objects; every chunk size cuts them at other places.
    rows = [{"a": "x\\\"y\u00e9\u4e2d\U0001F600", "n": -12.5e-3, "t": True, "f": False,
             "z": None, "l": [1, {"b": [2, 3]}]}, {"k": "\u2028"}, {}]
    path = tmp_path / "d.json"
    path.write_text("\ufeff[\r\n " + ",\n  ".join(json.dumps(r, ensure_ascii=False)
                                                 for r in rows) + "\n]\n", encoding="utf-8")
    assert _elements(path, size) == rows


@pytest.mark.parametrize("text, message", [
    ('[{"a": 1},\n {"a": }]', ":2: malformed JSON: Expecting value at column 8"),
    ('[{"a": 1},\n {"a": 2} {"a": 3}]', ":2: malformed JSON: Expecting ',' delimiter at "
                                         "column 11"),
    ('[{"a": 1},\n {"a": 2}', ":2: malformed JSON: Expecting ',' delimiter at column 10"),
    ('[{"a": 1},]', ":1: malformed JSON: Expecting value at column 11"),
    ('[{"a": 1}]\n x', ":2: malformed JSON: Extra data at column 2"),
    ('[{"a": "open\n"}]', ":1: malformed JSON: Invalid control character at column 13"),
])
@pytest.mark.parametrize("size", [1, 5, 1 << 20])
def test_json_array_errors_name_line_and_column(tmp_path, text, message, size):
    path = tmp_path / "d.json"
    path.write_text(text)
    with pytest.raises(DataError) as err:
        _elements(path, size)
    assert str(err.value) == f"{path}{message}"


@pytest.mark.parametrize("name,text", [("deep.json", "[" * 100_000),
                                       ("deep.jsonl", '{"instruction": ' + "[" * 100_000 + "\n")])
def test_json_nested_past_the_parser_is_a_data_error(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError, match=rf"{name}:1: malformed JSON: arrays or objects nested too"):
        read_indexed(path)


def _parquet_with_damaged_tail(path, n_groups: int = 40, rows: int = 2000):
    """Row 1 misses its answer; the last row group's data pages are overwritten with junk (its
    footer intact): read whole, the file fails on the junk instead of naming row 1."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = ["b"] * (n_groups * rows)
    out[1] = None
    table = pa.table({"instruction": ["a" * 200] * len(out), "output": out})
    pq.write_table(table, path, row_group_size=rows, compression="none")
    last = pq.ParquetFile(path).metadata.row_group(n_groups - 1).column(0)
    with path.open("r+b") as f:
        f.seek(last.data_page_offset)
        f.write(b"\xff" * 64)
    return path


def test_parquet_bad_row_is_reported_before_later_row_groups_are_read(tmp_path):
    path = _parquet_with_damaged_tail(tmp_path / "d.parquet")
    with pytest.raises(DataError, match=rf"{path}\[1\]: missing required field 'output'"):
        load_conversations(path, DataConfig())
