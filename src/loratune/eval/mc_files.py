"""Multiple-choice files in the public layouts: MMLU (CSV without a header: question, A, B, C,
D, answer), C-Eval (CSV: id, question, A-D, answer, explanation), CMMLU (CSV: index, Question,
A-D, Answer), and JSON/JSONL records (question, A-D or a `choices` list, answer as a letter or
a 0-based index, optional subject). The subject is a record's `subject`, else the file's name
without a split suffix (`abstract_algebra_test.csv` -> abstract_algebra). A folder is every
.csv/.json/.jsonl file in it (MMLU's test/ and dev/ folders).
"""

from __future__ import annotations

import csv
import io
import re
import string
from dataclasses import dataclass
from pathlib import Path

from loratune.data.errors import DataError
from loratune.data.formats import read_indexed, read_utf8

LETTERS = string.ascii_uppercase
SPLIT_SUFFIX = re.compile(r"_(test|dev|val|validation|train)$")


@dataclass
class Question:
    subject: str
    question: str
    options: list[str]
    answer: int           # index into options
    where: str            # file:line, for messages


def subject_of(path: Path) -> str:
    return SPLIT_SUFFIX.sub("", path.stem)


def _option_columns(names: list[str]) -> list[str]:
    """The consecutive letter columns A, B, C... (case as in the file)."""
    upper = {n.strip().upper(): n for n in names}
    out = []
    for letter in LETTERS:
        if letter not in upper:
            break
        out.append(upper[letter])
    return out


def _answer(value, n: int, where: str) -> int:
    text = str(value).strip()
    if text.upper() in LETTERS[:n] and text:
        return LETTERS.index(text.upper())
    if text.isdigit() and int(text) < n:
        return int(text)
    raise DataError(f"{where}: answer {value!r}: expected a letter {LETTERS[0]}-{LETTERS[n - 1]} "
                    f"or an index 0-{n - 1}")


def _question(record: dict, subject: str, where: str) -> Question:
    low = {k.strip().lower(): k for k in record if isinstance(k, str)}
    q_key, a_key = low.get("question"), low.get("answer")
    if q_key is None or a_key is None:
        raise DataError(f"{where}: expected fields question and answer (MMLU / C-Eval / CMMLU "
                        f"layout), got {', '.join(map(str, record))}")
    if "choices" in low:
        options = record[low["choices"]]
        if not isinstance(options, list):
            raise DataError(f"{where}: choices: expected a list of option texts")
    else:
        options = [record[c] for c in _option_columns(list(record))]
    if len(options) < 2:
        raise DataError(f"{where}: expected options A, B, ... (two or more), or a choices list")
    options = [str(o) for o in options]
    if "subject" in low and record[low["subject"]]:
        subject = str(record[low["subject"]])
    return Question(subject, str(record[q_key]), options,
                    _answer(record[a_key], len(options), where), where)


def _read_csv(path: Path) -> list[Question]:
    rows = list(csv.reader(io.StringIO(read_utf8(path), newline="")))
    if not rows:
        raise DataError(f"{path}: the file is empty")
    header = [c.strip().lower() for c in rows[0]]
    if "question" in header and "answer" in header:
        records = [(n, dict(zip(rows[0], row))) for n, row in enumerate(rows[1:], start=2)]
    else:  # MMLU: no header, question, options..., answer
        records = []
        for n, row in enumerate(rows, start=1):
            if len(row) < 4:
                raise DataError(f"{path}:{n}: expected question, two or more options and the "
                                f"answer (MMLU layout), got {len(row)} cells")
            records.append((n, {"question": row[0], **dict(zip(LETTERS, row[1:-1])),
                                "answer": row[-1]}))
    return [_question(r, subject_of(path), f"{path}:{n}") for n, r in records if any(r.values())]


def _read_file(path: Path) -> list[Question]:
    if path.suffix.lower() == ".csv":
        return _read_csv(path)
    if path.suffix.lower() not in (".json", ".jsonl"):
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; expected .csv, .json "
                        "or .jsonl")
    sep = ":" if path.suffix.lower() == ".jsonl" else "#"
    return [_question(r, subject_of(path), f"{path}{sep}{n}") for n, r in read_indexed(path)]


def read_questions(path: str | Path) -> list[Question]:
    """The questions of a file, or of every .csv/.json/.jsonl file in a folder (sorted)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".csv", ".json", ".jsonl"))
        if not files:
            raise DataError(f"{path}: no .csv, .json or .jsonl files in the folder")
        return [q for f in files for q in _read_file(f)]
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    out = _read_file(path)
    if not out:
        raise DataError(f"{path}: no questions")
    return out
