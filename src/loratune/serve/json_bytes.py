"""A JSON object recognised byte by byte: the argument part of a constrained tool call.

`JsonObject` is a small pushdown automaton over UTF-8 bytes. `feed(b)` says whether byte `b`
can continue a JSON object (RFC 8259, strings as valid UTF-8, no raw control characters),
`done` whether the object has closed, and `need()` the fewest bytes that close it from here.
The constrained decoder (tool_constraint.py) tries a token's bytes on a copy and keeps the
token only if every byte is accepted and what is left to write still fits in max_tokens, so a
forced call always ends as valid JSON.
"""

from __future__ import annotations

WS = frozenset(b" \t\n\r")
DIGITS = frozenset(b"0123456789")
ESCAPES = frozenset(b'"\\/bfnrtu')
HEX = frozenset(b"0123456789abcdefABCDEF")
LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}
MAX_DEPTH = 32     # json.loads and the templates' tojson cope; a model nesting deeper is looping
MAX_WS = 16        # white space in a row between tokens: pretty-printing needs a few, not pages

# modes: what the next byte may be
START, VALUE, VALUE_OR_CLOSE, KEY_OR_CLOSE, KEY, COLON, AFTER, STRING, ESCAPE, HEX4, NUMBER, \
    LITERAL, DONE = range(13)
# bytes a mode still needs before the value in hand is complete (see need())
_PENDING = {START: 2, VALUE: 1, VALUE_OR_CLOSE: 0, KEY_OR_CLOSE: 0, KEY: 4, COLON: 2, AFTER: 0,
            DONE: 0}
# number states: which may end the number, and the bytes each accepts next
_NUM_END = {"zero", "int", "frac", "exp"}


def _num_next(state: str, b: int) -> str | None:
    if state == "minus":
        return "zero" if b == 48 else "int" if b in DIGITS else None
    if state in ("int", "zero"):
        if b in DIGITS and state == "int":
            return "int"
        return "dot" if b == 46 else "e" if b in b"eE" else None
    if state in ("dot", "frac"):
        return "frac" if b in DIGITS else ("e" if state == "frac" and b in b"eE" else None)
    if state == "e":
        return "esign" if b in b"+-" else "exp" if b in DIGITS else None
    return "exp" if b in DIGITS else None     # esign, exp


class JsonObject:
    """The state of one JSON object being written; copy() before trying bytes on it."""

    __slots__ = ("mode", "stack", "key", "rest", "cont", "num", "ws")

    def __init__(self):
        self.mode, self.stack, self.key = START, "", False
        self.rest = b""      # the rest of true/false/null, or hex digits left after \\u
        self.cont = 0        # UTF-8 continuation bytes still owed inside a string
        self.num = ""
        self.ws = 0          # white space bytes in a row

    def copy(self) -> JsonObject:
        other = JsonObject.__new__(JsonObject)
        other.mode, other.stack, other.key = self.mode, self.stack, self.key
        other.rest, other.cont, other.num, other.ws = self.rest, self.cont, self.num, self.ws
        return other

    @property
    def done(self) -> bool:
        return self.mode == DONE

    def need(self) -> int:
        """The fewest bytes that complete the object from here (each open container's closer,
        plus what the value in hand lacks: a closing quote, a digit, ...)."""
        if self.mode in _PENDING:
            pending = _PENDING[self.mode]
        elif self.mode in (STRING, ESCAPE, HEX4):
            pending = self.cont + len(self.rest) + (self.mode == ESCAPE) + 1 + 2 * self.key
        elif self.mode == NUMBER:
            pending = 0 if self.num in _NUM_END else 1
        else:                   # LITERAL
            pending = len(self.rest)
        return pending + len(self.stack)

    def feed(self, b: int) -> bool:
        """Take byte `b` if JSON allows it here; False (state undefined: work on a copy) if not."""
        mode = self.mode
        if mode in (STRING, ESCAPE, HEX4):
            return self._string(b)
        if mode == NUMBER:
            nxt = _num_next(self.num, b)
            if nxt is not None:
                self.num = nxt
                return True
            if self.num not in _NUM_END:
                return False
            self.mode = AFTER
            return self.feed(b)
        if mode == LITERAL:
            if b != self.rest[0]:
                return False
            self.rest = self.rest[1:]
            self.mode = LITERAL if self.rest else AFTER
            return True
        if b in WS:
            self.ws += 1
            return mode != DONE and self.ws <= MAX_WS
        self.ws = 0
        return self._structure(b)

    def _structure(self, b: int) -> bool:
        mode = self.mode
        if mode == START:
            return b == ord("{") and self._open("o")
        if mode in (KEY_OR_CLOSE, KEY):
            if b == ord('"'):
                self.mode, self.key = STRING, True
                return True
            return mode == KEY_OR_CLOSE and b == ord("}") and self._close()
        if mode == COLON:
            if b == ord(":"):
                self.mode = VALUE
            return b == ord(":")
        if mode == AFTER:
            if b == ord(","):
                self.mode = KEY if self.stack[-1] == "o" else VALUE
                return True
            return b == ord("}" if self.stack[-1] == "o" else "]") and self._close()
        if mode == VALUE_OR_CLOSE and b == ord("]"):
            return self._close()
        return mode in (VALUE, VALUE_OR_CLOSE) and self._value(b)

    def _value(self, b: int) -> bool:
        if b in b"{[":
            return self._open("o" if b == ord("{") else "a")
        if b == ord('"'):
            self.mode, self.key = STRING, False
        elif b == ord("-") or b in DIGITS:
            self.mode, self.num = NUMBER, _num_next("minus", b) if b != ord("-") else "minus"
        elif b in LITERALS:
            self.mode, self.rest = LITERAL, LITERALS[b]
        else:
            return False
        return True

    def _open(self, kind: str) -> bool:
        if len(self.stack) >= MAX_DEPTH:
            return False
        self.stack += kind
        self.mode = KEY_OR_CLOSE if kind == "o" else VALUE_OR_CLOSE
        return True

    def _close(self) -> bool:
        self.stack = self.stack[:-1]
        self.mode = AFTER if self.stack else DONE
        return True

    def _string(self, b: int) -> bool:
        if self.mode == ESCAPE:
            if b not in ESCAPES:
                return False
            self.mode, self.rest = (HEX4, b"0000") if b == ord("u") else (STRING, b"")
            return True
        if self.mode == HEX4:
            if b not in HEX:
                return False
            self.rest = self.rest[1:]
            self.mode = HEX4 if self.rest else STRING
            return True
        if self.cont:                     # inside a multi-byte UTF-8 character
            if b & 0xC0 != 0x80:
                return False
            self.cont -= 1
            return True
        if b == ord('"'):
            self.mode = COLON if self.key else AFTER
            return True
        if b == ord("\\"):
            self.mode = ESCAPE
            return True
        return self._text_byte(b)

    def _text_byte(self, b: int) -> bool:
        """A byte of string text: printable ASCII, or the lead byte of a UTF-8 character
        (then 1 to 3 continuation bytes are owed)."""
        if b < 0x80:
            return b >= 0x20          # JSON strings hold no raw control characters
        for low, high, cont in ((0xC2, 0xDF, 1), (0xE0, 0xEF, 2), (0xF0, 0xF4, 3)):
            if low <= b <= high:
                self.cont = cont
                return True
        return False
