"""Reading a data file a piece at a time, so that its first bad record is reported before the
rest of the file is read (a 2 GB file with a typo on line 2 fails at once, in little memory).

Lines and UTF-8 text chunks name a byte that is not UTF-8 by line and offset; a JSON array is
parsed element by element. Keeping every record for training is another matter (the caller's).
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from pathlib import Path

from loratune.data.errors import DataError

CHUNK = 1 << 20  # bytes read at a time for .json files
_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+")
_BLANK = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()
TOO_DEEP = "arrays or objects nested too deeply"


def not_utf8(path: Path, line: int, offset: int, byte: int) -> DataError:
    return DataError(f"{path}:{line}: byte 0x{byte:02x} at offset {offset} is not UTF-8; "
                     "expected UTF-8 text (re-save the file as UTF-8)")


def text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text with its line ending) of each line, one at a time. "\\r\\n", "\\r" and
    "\\n" end a line, as universal newlines do; a leading byte-order mark is dropped."""
    n, offset = 0, 0
    with path.open("rb") as f:
        for raw in f:  # split on b"\n" only: no UTF-8 character holds that byte
            start, offset = offset, offset + len(raw)
            if start == 0 and raw.startswith(codecs.BOM_UTF8):
                raw, start = raw[len(codecs.BOM_UTF8):], len(codecs.BOM_UTF8)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                line = n + 1 + raw.count(b"\r", 0, err.start)  # lone "\r" ended lines too
                raise not_utf8(path, line, start + err.start, raw[err.start]) from None
            for match in _LINE.finditer(text):
                n += 1
                yield n, match.group()


def text_chunks(path: Path, size: int = CHUNK) -> Iterator[str]:
    """The file's text in pieces of about `size` bytes (a byte-order mark dropped)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines = 0, 0  # bytes and newlines before `data`
    with path.open("rb") as f:
        if f.read(len(codecs.BOM_UTF8)) == codecs.BOM_UTF8:
            offset = len(codecs.BOM_UTF8)
        else:
            f.seek(0)
        while True:
            data = f.read(size)
            pending = decoder.getstate()[0]  # the start of a character cut by the last read
            try:
                text = decoder.decode(data, final=not data)
            except UnicodeDecodeError as err:
                seen = pending + data
                raise not_utf8(path, lines + seen.count(b"\n", 0, err.start) + 1,
                               offset - len(pending) + err.start, seen[err.start]) from None
            offset, lines = offset + len(data), lines + data.count(b"\n")
            if text:
                yield text
            if not data:
                return


def _maybe_cut(err: json.JSONDecodeError, end: int) -> bool:
    """Whether a decode error may only mean the text read so far stops inside the value: errors
    a cut causes point at the last few characters, or at the start of a string left open."""
    return err.pos >= end - 16 or err.msg.startswith("Unterminated string")


class JsonStream:
    """JSON text read from `chunks` as far as needed; positions are indexes into `text`, which
    drops what was read when it grows. Errors name the file, line and column."""

    def __init__(self, chunks: Iterator[str], path: Path):
        self.chunks, self.path = chunks, path
        self.text, self.pos = "", 0
        self.line, self.col = 1, 1  # of text[0]
        self.eof = False

    def more(self) -> None:
        """Append at least as much text as is unread, so re-parsing a value cut short costs
        linear time overall; sets `eof` when the file has no more."""
        self._drop_read()
        want, got = max(len(self.text), 1), 0
        for chunk in self.chunks:
            self.text += chunk
            got += len(chunk)
            if got >= want:
                return
        self.eof = True

    def _drop_read(self) -> None:
        head = self.text[:self.pos]
        newlines = head.count("\n")
        self.line += newlines
        self.col = self.pos - head.rfind("\n") if newlines else self.col + self.pos
        self.text, self.pos = self.text[self.pos:], 0

    def error(self, msg: str, pos: int) -> DataError:
        head = self.text[:pos]
        newlines = head.count("\n")
        col = pos - head.rfind("\n") if newlines else self.col + pos
        # json's "Invalid control character at" already ends in "at".
        return DataError(f"{self.path}:{self.line + newlines}: malformed JSON: "
                         f"{msg.removesuffix(' at')} at column {col}")

    def next_char(self) -> str:
        """The next character that is not blank (left unread), or '' at the end of the file."""
        while True:
            self.pos = _BLANK.match(self.text, self.pos).end()
            if self.pos < len(self.text):
                return self.text[self.pos]
            if self.eof:
                return ""
            self.more()

    def value(self) -> object:
        """The JSON value at the read position (reading more while it may be cut short)."""
        while True:
            try:
                value, self.pos = _DECODER.raw_decode(self.text, self.pos)
                return value
            except json.JSONDecodeError as err:
                if self.eof or not _maybe_cut(err, len(self.text)):
                    raise self.error(err.msg, err.pos) from None
                self.more()
            except RecursionError:  # "[[[[..." 100k deep: json's C parser recurses per level
                raise self.error(TOO_DEEP, self.pos) from None

    def expect_end(self) -> None:
        if self.next_char():
            raise self.error("Extra data", self.pos)

    def array(self) -> Iterator[object]:
        """The elements of the array at the read position (its '['), one at a time."""
        self.pos += 1
        if self.next_char() == "]":
            self.pos += 1
            self.expect_end()
            return
        while True:
            self.next_char()
            yield self.value()
            sep = self.next_char()
            if sep not in (",", "]"):
                raise self.error("Expecting ',' delimiter", self.pos)
            self.pos += 1
            if sep == "]":
                self.expect_end()
                return

    def whole(self) -> object:
        """The one JSON value of the file, read whole."""
        while not self.eof:
            self.more()
        self.next_char()
        value = self.value()
        self.expect_end()
        return value
