"""Raw text for continued pretraining (`data.format: text`): documents, tokenized, with the loss
on every token.

A document is a blank-line-separated block of a .txt file (or the whole file: `data.documents:
file`), or the `data.text_column` field of a record (.jsonl, .json, .csv, .parquet); a folder
gives the documents of every such file in it, in path order. Each document is tokenized with the
tokenizer's own special tokens (a BOS where it adds one) and ends with EOS.

A document longer than max_length is cut into pieces that overlap by one token: a piece's first
token carries no loss (nothing before it in its segment), so the overlap gives every token but
the document's first exactly one label. Pieces are examples like any other: packing puts several
in a row with position_ids restarting at each (data/packing.py), so no token attends across
documents.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from loratune.config import DataConfig
from loratune.data.encode import IGNORE, Example
from loratune.data.errors import DataError
from loratune.data.formats import READERS, read_text_file
from loratune.data.hf_datasets import glob_files, is_dataset_source, is_glob, iter_records
from loratune.data.streaming import text_lines

TEXT_SUFFIXES = (".txt", ".md")
_BLANK_LINE = re.compile(r"[ \t]*")


def _blocks(path: Path) -> Iterator[tuple[str, str]]:
    """(path:first line, text) of each run of non-blank lines, as the file is read."""
    lines, first = [], 0
    for n, line in text_lines(path):
        line = line.rstrip("\r\n")
        if _BLANK_LINE.fullmatch(line):
            if lines:
                yield f"{path}:{first}", "\n".join(lines)
            lines = []
            continue
        if not lines:
            first = n
        lines.append(line)
    if lines:
        yield f"{path}:{first}", "\n".join(lines)


def _record_texts(path: Path, cfg: DataConfig) -> Iterator[tuple[str, str]]:
    column = cfg.text_column
    for where, record in iter_records(str(path), cfg):
        value = record.get(column)
        if not isinstance(value, str):
            got = "nothing" if value is None else type(value).__name__
            raise DataError(f"{where}: expected a string field '{column}' (data.format: text "
                            f"reads data.text_column), got {got}; fields: {sorted(record)}")
        yield where, value


def _file_documents(path: Path, cfg: DataConfig) -> Iterator[tuple[str, str]]:
    if path.suffix.lower() not in TEXT_SUFFIXES:
        yield from _record_texts(path, cfg)
    elif not path.is_file():
        raise DataError(f"data file not found: {path}")
    elif cfg.documents == "file":
        yield str(path), read_text_file(path)
    else:
        yield from _blocks(path)


def _folder_files(folder: Path) -> list[Path]:
    kinds = TEXT_SUFFIXES + tuple(READERS)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in kinds
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise DataError(f"{folder}: no {', '.join(kinds)} files in this folder "
                        "(data.format: text)")
    return files


def iter_documents(path: str | Path, cfg: DataConfig) -> Iterator[tuple[str, str]]:
    """(where, text) of every non-blank document of a file or folder, as they are read."""
    if is_glob(str(path)):
        files = [Path(f) for f in glob_files(str(path))]
    elif is_dataset_source(str(path)):  # a saved dataset, an .arrow file, a Hub id
        files = [Path(path)]
    else:
        path = Path(path)
        files = _folder_files(path) if path.is_dir() else [path]
    for file in files:
        for where, text in _file_documents(file, cfg):
            if text.strip():
                yield where, text


def document_ids(text: str, tokenizer) -> list[int]:
    """Token ids of one document: the tokenizer's special tokens (BOS where it adds one), then
    EOS, so that the model learns where a document ends."""
    return documents_ids([text], tokenizer)[0]


def documents_ids(texts: list[str], tokenizer) -> list[list[int]]:
    """`document_ids` of several documents in one tokenizer call (a fast tokenizer spreads a
    list over its threads: 1.7x the tokens/s of one call per document on 2 busy cores)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("data.format: text ends every document with EOS, and this tokenizer has "
                        "no eos token")
    out = []
    for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]:
        ids = list(ids)
        out.append(ids if ids and ids[-1] == eos else ids + [eos])
    return out


def split_document(ids: list[int], max_length: int) -> list[Example]:
    """Pieces of at most max_length tokens overlapping by one; every token but the first has a
    label in exactly one piece (the first of each piece is context only)."""
    step = max_length - 1
    pieces = [ids[s:s + max_length] for s in range(0, max(len(ids) - 1, 1), step)]
    return [Example(p, [IGNORE, *p[1:]]) for p in pieces if len(p) > 1]
