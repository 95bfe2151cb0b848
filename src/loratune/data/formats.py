"""Read data files (JSON, JSONL, CSV, Parquet) and turn alpaca / messages / sharegpt records
into OpenAI-style message lists."""

from __future__ import annotations

import json
import math
from pathlib import Path


class DataError(ValueError):
    """Bad input data; the message names the file, the line or record, and the field."""


Located = tuple[str, dict]  # ("file:line", record)

ROLES = {"system", "user", "assistant"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "model": "assistant"}


def _clean(value):
    # pandas gives NaN for empty CSV cells; treat them as missing.
    return None if isinstance(value, float) and math.isnan(value) else value


def read_located(path: str | Path) -> list[Located]:
    """Records with where they came from, for error messages."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        out = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{n}: malformed JSON ({err.msg} at column {err.colno})")
            if not isinstance(record, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
            out.append((f"{path}:{n}", record))
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a list of objects (or {{\"data\": [...]}})")
        out = [(f"{path}[{i}]", r) for i, r in enumerate(data)]
        bad = next((w for w, r in out if not isinstance(r, dict)), None)
        if bad:
            raise DataError(f"{bad}: expected a JSON object")
    elif suffix in (".csv", ".parquet"):
        import pandas as pd

        frame = pd.read_csv(path, keep_default_na=False) if suffix == ".csv" \
            else pd.read_parquet(path)
        first = 2 if suffix == ".csv" else 0  # CSV: line 1 is the header
        out = [(f"{path}:{i + first}" if suffix == ".csv" else f"{path} row {i}",
                {k: _clean(v) for k, v in row.items()})
               for i, row in enumerate(frame.to_dict(orient="records"))]
    else:
        raise DataError(f"{path}: unsupported file type '{suffix}' (use .json, .jsonl, .csv, "
                        ".parquet)")
    if not out:
        raise DataError(f"{path}: the dataset is empty")
    return out


def read_records(path: str | Path) -> list[dict]:
    return [r for _, r in read_located(path)]


def detect_format(record: dict, where: str = "record") -> str:
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record or "output" in record:
        return "alpaca"
    raise DataError(f"{where}: cannot tell the format from keys {sorted(record)}; expected "
                    "alpaca (instruction/input/output), messages, or sharegpt (conversations)")


def _text(record: dict, field: str, where: str, required: bool = True) -> str:
    value = _clean(record.get(field))
    if value is None or (required and value == ""):
        if required:
            raise DataError(f"{where}: missing required field '{field}'")
        return ""
    if not isinstance(value, str):
        if isinstance(value, (int, float)):
            return str(value)
        raise DataError(f"{where}: field '{field}' must be text, got {type(value).__name__}")
    return value


def _alpaca(record: dict, where: str) -> list[dict]:
    messages = []
    system = _text(record, "system", where, required=False)
    if system:
        messages.append({"role": "system", "content": system})
    history = _clean(record.get("history")) or []
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise DataError(f"{where}: history[{i}] must be a [user, assistant] pair")
        messages += [{"role": "user", "content": str(pair[0])},
                     {"role": "assistant", "content": str(pair[1])}]
    user = _text(record, "instruction", where)
    extra = _text(record, "input", where, required=False)
    messages.append({"role": "user", "content": f"{user}\n\n{extra}" if extra else user})
    messages.append({"role": "assistant", "content": _text(record, "output", where)})
    return messages


def _turns(record: dict, key: str, role_key: str, text_key: str, roles: dict, where: str):
    turns = record.get(key)
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field '{key}' must be a non-empty list of turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: {key}[{i}] must be an object")
        role = turn.get(role_key)
        if role not in roles:
            raise DataError(f"{where}: {key}[{i}].{role_key} is {role!r}; expected one of "
                            f"{sorted(roles)}")
        messages.append({"role": roles[role], "content": _text(turn, text_key, f"{where} "
                                                                f"{key}[{i}]", required=False)})
    return messages


def to_messages(record: dict, fmt: str, where: str = "record",
                system_prompt: str | None = None) -> list[dict]:
    """One record as [{role, content}, ...] ending with an assistant turn."""
    if fmt == "auto":
        fmt = detect_format(record, where)
    if fmt == "alpaca":
        messages = _alpaca(record, where)
    elif fmt == "messages":
        messages = _turns(record, "messages", "role", "content", {r: r for r in ROLES}, where)
    elif fmt == "sharegpt":
        messages = _turns(record, "conversations", "from", "value", SHAREGPT_ROLES, where)
    else:
        raise DataError(f"unknown data format '{fmt}' (alpaca, messages, sharegpt or auto)")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the conversation must end with an assistant turn")
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages
