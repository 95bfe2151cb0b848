"""Read data files (JSON, JSONL, CSV, Parquet) and turn alpaca / messages / sharegpt records
into OpenAI-style message lists.

Every record carries an index for error messages: the line number in line-based files
(.jsonl, .csv), the 0-based position in the list otherwise (.json, .parquet).
"""

from __future__ import annotations

import codecs
import csv
import json
import math
from collections.abc import Iterator
from pathlib import Path

from loratune.data.errors import DataError
from loratune.data.streaming import TOO_DEEP, JsonStream, not_utf8, text_chunks, text_lines

FORMATS = ("alpaca", "messages", "sharegpt")
LINE_BASED = (".jsonl", ".csv")
ROLES = ("system", "user", "assistant")
IMAGE_PARTS = ("image", "image_url")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant"}


def locate(source: str | Path | None, index: int | None) -> str:
    """How an error names a record: `file.jsonl:12`, `file.json[3]`, or `record 3`."""
    if source is None:
        return "record" if index is None else f"record {index}"
    if index is None:
        return str(source)
    if str(source).lower().endswith(LINE_BASED):  # not Path(): called once per record
        return f"{source}:{index}"
    return f"{source}[{index}]"


def read_utf8(path: Path) -> str:
    """The file's text, line endings untouched; a byte that is not UTF-8 is named by line and
    offset (spreadsheets often save CSV as Latin-1 or UTF-16)."""
    data = path.read_bytes()
    try:
        # utf-8-sig: files saved by Windows tools often start with a byte-order mark.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        offset = err.start + (len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0)
        raise not_utf8(path, data.count(b"\n", 0, offset) + 1, offset, data[offset]) from None


def read_text_file(path: Path) -> str:
    """The file's text with universal newlines, as text-mode reads give: CRLF and a lone CR
    end lines too; not UTF-8 is refused as `read_utf8` does."""
    return read_utf8(path).replace("\r\n", "\n").replace("\r", "\n")


# Every reader yields records as it reads them, so that the first bad one (malformed, or
# refused by whoever consumes the records) is reported before the rest of the file is read.


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    # Lines end at "\n", "\r\n" or "\r" only: str.splitlines() also breaks on U+2028 and
    # friends, which JSON allows raw inside strings, and would shift every later line number.
    for n, line in text_lines(path):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{n}: malformed JSON: {err.msg.removesuffix(' at')} at "
                            f"column {err.colno}") from None
        except RecursionError:
            raise DataError(f"{path}:{n}: malformed JSON: {TOO_DEEP}") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
        yield n, record


def _json_records(path: Path) -> Iterator[object]:
    """The elements of a top-level array, one at a time; any other document is read whole
    (a {"data": [...]} file too: its list may come after other keys)."""
    stream = JsonStream(text_chunks(path), path)
    if stream.next_char() == "[":
        yield from stream.array()
        return
    data = stream.whole()
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        yield from data["data"]
        return
    raise DataError(f"{path}: expected a list of objects or {{\"data\": [...]}}, "
                    f"got {type(data).__name__}")


def _read_json(path: Path) -> Iterator[tuple[int, dict]]:
    for i, record in enumerate(_json_records(path)):
        if not isinstance(record, dict):
            raise DataError(f"{path}[{i}]: expected a JSON object, got {type(record).__name__}")
        yield i, record


def _read_csv(path: Path) -> Iterator[tuple[int, dict]]:
    # The csv module rather than pandas: every cell stays text ("007" is not 7), and
    # line_num gives true line numbers even when quoted cells span several lines.
    reader = csv.DictReader(line for _, line in text_lines(path))
    if reader.fieldnames is None:
        return
    end = reader.line_num
    for row in reader:
        start, end = end + 1, reader.line_num
        if None in row:
            raise DataError(f"{path}:{start}: {len(row[None])} more cells than the "
                            f"{len(reader.fieldnames)} header columns")
        yield start, row


PARQUET_BATCH = 1024  # rows decoded at a time: a bad record stops the reading in its batch


def _read_parquet(path: Path) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq

    # Batch by batch (row group by row group), not read_table: a 2 GB file is not read whole
    # before its first record is used. pyarrow's to_pylist gives plain lists and dicts for
    # nested columns (pandas would give numpy arrays) and None for nulls.
    n = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH):
        for record in batch.to_pylist():
            yield n, record
            n += 1


READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv,
           ".parquet": _read_parquet}


def iter_indexed(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Records of a data file with their index (line number or list position), read as they
    are asked for: a bad record stops the reading there."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a directory; expected a data file ({', '.join(READERS)})")
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; expected one of "
                        f"{', '.join(READERS)}")
    return _nonempty_records(path, reader(path))


def _nonempty_records(path: Path, records: Iterator) -> Iterator[tuple[int, dict]]:
    empty = True
    for item in records:
        empty = False
        yield item
    if empty:
        raise DataError(f"{path}: the dataset is empty (no records)")


def read_indexed(path: str | Path) -> list[tuple[int, dict]]:
    """Records of a data file with their index (line number or list position)."""
    return list(iter_indexed(path))


def read_records(path: str | Path) -> list[dict]:
    """All records of a .json, .jsonl, .csv or .parquet file, as dicts."""
    return [record for _, record in iter_indexed(path)]


def detect_format(record: dict, where: str = "record") -> str:
    """'messages', 'sharegpt' or 'alpaca', from the keys of one record."""
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    # Either alpaca key is enough: a record missing the other then gets a 'missing field'
    # error, which says more than 'unknown format'.
    if "instruction" in record or "output" in record:
        return "alpaca"
    raise DataError(f"{where}: cannot tell the format from keys {sorted(record)}; expected "
                    "alpaca (instruction, output), messages (messages) or sharegpt (conversations)")


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _text(value, field: str, where: str, required: bool = True) -> str:
    """A text field; numbers are accepted as their text (JSON answers like 42)."""
    if _missing(value):
        if required:
            raise DataError(f"{where}: missing required field '{field}'")
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       for p in value):
        # OpenAI content parts: [{"type": "text", "text": "..."}, ...]
        return "".join(_text(p.get("text"), f"{field}.text", where) for p in value)
    if isinstance(value, list) and any(isinstance(p, dict) and p.get("type") in IMAGE_PARTS
                                       for p in value):
        raise DataError(f"{where}: field '{field}' holds an image part; images need a "
                        "vision-language model (data/images.py, models/vision.py)")
    raise DataError(f"{where}: field '{field}' must be text, got {type(value).__name__}")


def _nonempty(value, field: str, where: str) -> str:
    # An empty cell is how CSV and spreadsheets spell "missing"; an alpaca record without
    # an instruction or an answer is a data error, not something to learn.
    text = _text(value, field, where)
    if not text.strip():
        raise DataError(f"{where}: field '{field}' is empty")
    return text


def _list(value, field: str, where: str) -> list:
    """A list field; CSV cells can only hold it as JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: field '{field}' is text but not a JSON list ({err.msg})") \
                from None
    if _missing(value):
        raise DataError(f"{where}: missing required field '{field}'")
    if not isinstance(value, list):
        raise DataError(f"{where}: field '{field}' must be a list, got {type(value).__name__}")
    return value


def _alpaca(record: dict, where: str) -> list[dict]:
    messages = []
    system = _text(record.get("system"), "system", where, required=False)
    if system:
        messages.append({"role": "system", "content": system})
    history = [] if _missing(record.get("history")) or record.get("history") == "" \
        else _list(record["history"], "history", where)
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise DataError(f"{where}: history[{i}] must be a [user, assistant] pair")
        messages.append({"role": "user", "content": _text(pair[0], f"history[{i}][0]", where)})
        messages.append({"role": "assistant",
                         "content": _text(pair[1], f"history[{i}][1]", where)})
    instruction = _nonempty(record.get("instruction"), "instruction", where)
    extra = _text(record.get("input"), "input", where, required=False)
    messages.append({"role": "user",
                     "content": f"{instruction}\n\n{extra}" if extra.strip() else instruction})
    messages.append({"role": "assistant",
                     "content": _nonempty(record.get("output"), "output", where)})
    return messages


def _turns(record: dict, key: str, role_key: str, text_key: str, roles: dict[str, str],
           where: str) -> list[dict]:
    turns = _list(record.get(key), key, where)
    if not turns:
        raise DataError(f"{where}: field '{key}' is an empty list")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: {key}[{i}] must be an object with '{role_key}' and "
                            f"'{text_key}', got {type(turn).__name__}")
        role = turn.get(role_key)
        if role not in roles:
            raise DataError(f"{where}: {key}[{i}].{role_key} is {role!r}; expected one of "
                            f"{', '.join(roles)}")
        content = _text(turn.get(text_key), f"{key}[{i}].{text_key}", where)
        messages.append({"role": roles[role], "content": content})
    return messages


def to_messages(record: dict, fmt: str = "auto", index: int | None = None,
                source: str | Path | None = None,
                system_prompt: str | None = None) -> list[dict]:
    """One record as [{role, content}, ...] ending with an assistant turn.

    `index` and `source` only name the record in errors; `system_prompt` is used when the
    record has no system turn of its own.
    """
    where = locate(source, index)
    if fmt == "auto":
        fmt = detect_format(record, where)
    if fmt == "alpaca":
        messages = _alpaca(record, where)
    elif fmt == "messages":
        messages = _turns(record, "messages", "role", "content", {r: r for r in ROLES}, where)
    elif fmt == "sharegpt":
        messages = _turns(record, "conversations", "from", "value", SHAREGPT_ROLES, where)
    else:
        raise DataError(f"unknown data format '{fmt}'; expected auto, {', '.join(FORMATS)}")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the conversation must end with an assistant turn, "
                        f"not '{messages[-1]['role']}'")
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages
