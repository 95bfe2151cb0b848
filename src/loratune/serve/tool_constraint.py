"""tool_choice "required" or a named function: the answer is a valid call of a declared tool,
written in the family's own format.

Prefix forcing, then a grammar. The family's call opener up to the name (`<tool_call>\\n{"name":`
for Hermes) ends the prompt; from there every token of the row must keep the answer inside
`CallSpec`: one of the allowed names as the template writes it (` "get_weather",
"arguments":`), a JSON object (json_bytes.JsonObject), the call's closer, then end of text (or,
with parallel calls, the next call's opener and another call). The grammar runs on the bytes
of each token (`token_symbols`), so a token that spans a structural character is judged whole.

Per step, only tokens whose first byte the grammar takes are scored (TokenTable.mask), and only
candidates are tried whole (ToolConstraint.candidates: outside a string exactly the valid tokens,
so a step tries a handful, not thousands, whatever the logits favour); a row's token is then its best-scored token the grammar accepts whole (greedy), or a draw from its own
distribution (temperature, top-k, top-p) restricted to the tokens the grammar accepts. A token
is valid only if what the call still needs, counted in bytes, fits in the tokens max_tokens
leaves, so a forced call always closes. Only the constrained row's choice goes through here:
the batch's forward and every other row are untouched.
"""

from __future__ import annotations

import codecs
import json
import uuid
from bisect import bisect_left
from dataclasses import dataclass

import torch

from loratune.serve.json_bytes import ESCAPE, HEX4, START, STRING, WS, JsonObject
from loratune.serve.sampling import sampling_probs
from loratune.serve.types import ServeError

EOS = 256            # the symbol an end-of-sequence token stands for (bytes are 0-255)
REJECT, LIT, ARG, CALL, END = range(5)     # what a symbol was (CallState.feed)


@dataclass(frozen=True)
class CallFormat:
    opener: str           # ends the prompt: the first call up to its name
    args_key: str         # "arguments" or Llama 3's "parameters"
    close: str            # after the arguments' object: closes one call
    end: str              # after the last call
    again: str | None     # between two calls (None: one call only)


# As each family's chat template writes an assistant's calls (tests/fixtures/templates).
FORMATS = {
    "hermes": CallFormat('<tool_call>\n{"name":', "arguments", "}\n</tool_call>", "",
                         '\n<tool_call>\n{"name":'),
    "llama3_json": CallFormat('{"name":', "parameters", "}", "", None),
    "mistral": CallFormat('[TOOL_CALLS] [{"name":', "arguments", "}", "]", ', {"name":'),
    "phi4": CallFormat('<|tool_call|>[{"name":', "arguments", "}", "]", ', {"name":'),
}


def _syms(text: str) -> tuple[int, ...]:
    return tuple(text.encode("utf-8"))


class CallSpec:
    """The calls a request allows: which names, one or several, in which family's format."""

    def __init__(self, parser: str, names: list[str], parallel: bool):
        fmt = FORMATS[parser]
        self.opener = fmt.opener
        self.names = [(_syms(f" {json.dumps(n, ensure_ascii=False)}, \"{fmt.args_key}\":"), n)
                      for n in names]
        finish = _syms(fmt.close + fmt.end) + (EOS,)
        self.closes = [(finish, False)]
        if parallel and fmt.again is not None:
            self.closes.append((_syms(fmt.close + fmt.again), True))
        self.finish_need = len(finish)
        self.name_need = min(len(s) for s, _ in self.names) + 2 + self.finish_need


class CallState:
    """Where an answer stands in its CallSpec: segment 0 a name, 1 the arguments, 2 a closer."""

    __slots__ = ("spec", "seg", "pos", "alive", "json", "name")

    def __init__(self, spec: CallSpec):
        self.spec, self.name, self.json = spec, None, None
        self._choose(0)

    def _choose(self, seg: int) -> None:
        self.seg, self.pos = seg, 0
        self.alive = tuple(range(len(self.spec.names if seg == 0 else self.spec.closes)))

    def copy(self) -> CallState:
        other = CallState.__new__(CallState)
        other.spec, other.seg, other.pos, other.alive = self.spec, self.seg, self.pos, self.alive
        other.json = self.json.copy() if self.json is not None else None
        other.name = self.name
        return other

    def need(self) -> int:
        """The fewest symbols (bytes and the final EOS) that finish the answer from here."""
        spec = self.spec
        if self.seg == 0:
            return min(len(spec.names[a][0]) for a in self.alive) - self.pos + 2 + \
                spec.finish_need
        if self.seg == 1:
            return self.json.need() + spec.finish_need
        if self.seg == 2:
            return min(len(spec.closes[a][0]) - self.pos + (spec.name_need if spec.closes[a][1]
                                                            else 0) for a in self.alive)
        return 0

    def feed(self, sym: int) -> int:
        """Take one symbol; what it was (LIT, ARG, CALL: a name completed, END), or REJECT
        (the state is then undefined: try symbols on a copy)."""
        if self.seg == 1:
            leading = self.json.mode == START     # white space before the object's "{"
            if sym == EOS or not self.json.feed(sym):
                return REJECT
            if self.json.done:
                self._choose(2)
            return LIT if leading and sym in WS else ARG
        if self.seg == 3:
            return REJECT
        alts = self.spec.names if self.seg == 0 else self.spec.closes
        alive = tuple(a for a in self.alive if alts[a][0][self.pos] == sym)
        if not alive:
            return REJECT
        self.alive, self.pos = alive, self.pos + 1
        syms, tag = alts[alive[0]]
        if len(syms) > self.pos:
            return LIT
        if self.seg == 0:
            self.name, self.json, self.seg = tag, JsonObject(), 1
            return CALL
        if tag:                     # another call follows
            self._choose(0)
            return LIT
        self.seg = 3
        return END


_BYTE_LEVEL: dict[str, int] | None = None


def _byte_level_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character each byte is spelled with in the vocabulary."""
    global _BYTE_LEVEL
    if _BYTE_LEVEL is None:
        keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
        extra = [b for b in range(256) if b not in keep]
        _BYTE_LEVEL = {chr(b): b for b in keep} | {chr(256 + i): b for i, b in enumerate(extra)}
    return _BYTE_LEVEL


def _piece_bytes(piece: str, byte_level: bool) -> bytes:
    if byte_level:
        table = _byte_level_chars()
        if all(c in table for c in piece):
            return bytes(table[c] for c in piece)
        return piece.encode("utf-8")
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):   # byte fallback
        return bytes([int(piece[3:5], 16)])
    return piece.replace("\u2581", " ").encode("utf-8")                       # SentencePiece


class TokenTable:
    """Each token id's symbols (`syms`: its bytes; (EOS,) for the engine's end tokens; None for
    other special tokens, which a forced call never writes), the ids by first symbol, and the
    tokens' bytes in sorted order (a trie without nodes: the tokens below a prefix are one
    slice), so a step outside a string walks only the byte paths the grammar takes."""

    def __init__(self, syms: list[tuple[int, ...] | None]):
        self.syms = syms
        firsts: dict[int, list[int]] = {}
        for i, s in enumerate(syms):
            if s:
                firsts.setdefault(s[0], []).append(i)
        self.by_first = {sym: torch.tensor(ids) for sym, ids in firsts.items()}
        spelled = sorted((bytes(s), i) for i, s in enumerate(syms) if s and s != (EOS,))
        self.spelled = [s for s, _ in spelled]
        self.spelled_ids = [i for _, i in spelled]
        self.eos_ids = [i for i, s in enumerate(syms) if s == (EOS,)]
        # no '"' nor '\\': inside a string such a token cannot shorten what the call needs
        self.quiet = torch.tensor([bool(s) and s != (EOS,) and 34 not in s and 92 not in s
                                   for s in syms], dtype=torch.bool)

    def __getitem__(self, token: int) -> tuple[int, ...] | None:
        return self.syms[token] if 0 <= token < len(self.syms) else None

    def mask(self, state: CallState, size: int) -> torch.Tensor:
        """[size] bools: the tokens whose first symbol `state` takes."""
        mask = torch.zeros(size, dtype=torch.bool)
        taken = [ids for sym, ids in self.by_first.items() if state.copy().feed(sym)]
        if taken:
            ids = torch.cat(taken)
            mask[ids[ids < size]] = True
        return mask

    def walk(self, state: CallState, budget: int, size: int) -> torch.Tensor:
        """[size] bools: exactly the tokens `state` takes whole leaving need() <= budget. The
        cost is the byte paths the grammar takes: small outside a string, where few bytes
        continue; inside one almost every path does (use mask() there)."""
        found = [i for i in self.eos_ids if state.copy().feed(EOS) and budget >= 0]
        self._walk(state, budget, 0, len(self.spelled), 0, found)
        mask = torch.zeros(size, dtype=torch.bool)
        ids = torch.tensor(found, dtype=torch.long)
        mask[ids[ids < size]] = True
        return mask

    def _walk(self, state: CallState, budget: int, lo: int, hi: int, depth: int,
              found: list[int]) -> None:
        spelled = self.spelled
        while lo < hi and len(spelled[lo]) == depth:      # a prefix sorts before its longer kin
            if state.need() <= budget:
                found.append(self.spelled_ids[lo])
            lo += 1
        while lo < hi:
            byte = spelled[lo][depth]
            end = hi if byte == 255 else \
                bisect_left(spelled, spelled[lo][:depth] + bytes([byte + 1]), lo, hi)
            after = state.copy()
            if after.feed(byte):
                self._walk(after, budget, lo, end, depth + 1, found)
            lo = end


_TABLES: dict[int, tuple[object, frozenset, TokenTable]] = {}


def token_symbols(tokenizer, eos: set[int]) -> TokenTable:
    """The TokenTable of a tokenizer: byte-level BPE (GPT-2, Llama 3, Qwen, Phi-4) or
    SentencePiece pieces (▁ and <0xNN>). Built once per tokenizer."""
    cached = _TABLES.get(id(tokenizer))
    if cached is not None and cached[0] is tokenizer and cached[1] == frozenset(eos):
        return cached[2]
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    byte_level = "ByteLevel" in repr(decoder)
    added = dict(getattr(tokenizer, "added_tokens_decoder", {}))
    special = set(tokenizer.all_special_ids)
    syms: list[tuple[int, ...] | None] = []
    for i, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if i in eos:
            syms.append((EOS,))
        elif i in special or piece is None or getattr(added.get(i), "special", False):
            syms.append(None)
        elif i in added:
            syms.append(_syms(added[i].content))
        else:
            syms.append(tuple(_piece_bytes(piece, byte_level)) or None)
    table = TokenTable(syms)
    _TABLES[id(tokenizer)] = (tokenizer, frozenset(eos), table)
    return table


class ToolConstraint:
    """One request's constrained token choice; the engine calls choose() once per step."""

    def __init__(self, spec: CallSpec, table: TokenTable, max_tokens: int):
        self.state, self.table, self.left = CallState(spec), table, max_tokens

    def fits(self, token: int) -> CallState | None:
        """The state after `token`, or None if the grammar refuses it or the call could no
        longer close within max_tokens."""
        syms = self.table[token]
        if not syms:
            return None
        state = self.state.copy()
        for sym in syms:
            if not state.feed(sym):
                return None
        return state if state.need() <= self.left - 1 else None

    def choose(self, logits: torch.Tensor, params, generator) -> int:
        allowed = self.table.mask(self.state, logits.numel()).to(logits.device)
        logits = logits.masked_fill(~allowed, float("-inf"))
        hopeless = ~self.candidates(logits.numel())
        found = None
        if params.temperature > 0:
            # Exponential race: ordering tokens by log p - log E (E ~ Exp(1)) is a draw
            # without replacement, so the first valid one is a draw from p restricted to
            # the valid tokens; one random vector per step. p is over `allowed` (as the
            # request's top-k/top-p see it); `hopeless` tokens only leave the race.
            probs = sampling_probs(logits, params).cpu()
            noise = torch.empty_like(probs).exponential_(generator=generator)
            found = self._first_valid((probs.log() - noise.log()).masked_fill(hopeless, -1e30))
        found = found or self._first_valid(logits.cpu().masked_fill(hopeless, float("-inf")))
        if found is None:
            raise ServeError("tool_choice: no token of the vocabulary continues the forced "
                             "tool call within max_tokens", param="tool_choice")
        token, self.state = found
        self.left -= 1
        return token

    def candidates(self, size: int) -> torch.Tensor:
        """[size] bools: the tokens worth trying whole (fits) this step, a superset of the
        valid ones. Each try is Python work on the engine thread, so: outside a string the
        table's walk gives exactly the valid tokens; inside one, when the budget is tight
        (need == tokens left), a token without '"' or '\\' keeps need() as it is (or adds
        owed UTF-8 bytes), so it cannot fit."""
        state, budget = self.state, self.left - 1
        if state.seg != 1 or state.json.mode not in (STRING, ESCAPE, HEX4):
            return self.table.walk(state, budget, size)
        mask = self.table.mask(state, size)
        if state.json.mode == STRING and not state.json.cont and state.need() > budget:
            mask &= ~self.table.quiet[:size]
        return mask

    def _first_valid(self, scores: torch.Tensor) -> tuple[int, CallState] | None:
        """The highest-scored valid token (-inf: never): candidates in order, a few at a time."""
        n, seen = int(torch.isfinite(scores).sum()), 0
        for k in (8, 512, n):
            for token in torch.topk(scores, min(k, n)).indices.tolist()[seen:]:
                state = self.fits(token)
                if state is not None:
                    return token, state
            seen = min(k, n)
        return None


class CallReader:
    """A constrained answer's token ids read back into calls as they come: the OpenAI stream
    deltas (a call's id, type and name first, then its argument text) and the whole calls."""

    def __init__(self, spec: CallSpec, table: TokenTable):
        self.state, self.table, self.broken = CallState(spec), table, False
        self.calls: list[dict] = []
        self._decoder = None

    def feed(self, ids: list[int]) -> list[dict]:
        """Deltas (OpenAI `tool_calls` entries) for the next tokens of the answer."""
        out, args = [], bytearray()
        for token in ids:
            for sym in self.table[token] or ():
                kind = REJECT if self.broken else self.state.feed(sym)
                self.broken = self.broken or kind == REJECT
                if kind == CALL:
                    out += self._args(args)
                    out.append(self._start(self.state.name))
                elif kind == ARG:
                    args.append(sym)
        return out + self._args(args)

    def _start(self, name: str) -> dict:
        call = {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                "function": {"name": name, "arguments": ""}}
        self.calls.append(call)
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        return {"index": len(self.calls) - 1, **call, "function": dict(call["function"])}

    def _args(self, raw: bytearray) -> list[dict]:
        text = self._decoder.decode(bytes(raw)) if raw else ""
        raw.clear()
        if not text:
            return []
        self.calls[-1]["function"]["arguments"] += text
        return [{"index": len(self.calls) - 1, "function": {"arguments": text}}]

    def complete(self) -> list[dict] | None:
        """The calls, once the answer ended where the grammar allows it to; else None."""
        done = not self.broken and self.state.copy().feed(EOS) == END
        return self.calls if done and self.calls else None


def force_call(tokenizer, eos: set[int], parser: str, names: list[str], parallel: bool,
               max_tokens: int) -> tuple[list[int], ToolConstraint, CallReader]:
    """(prompt suffix ids, the engine's constraint, the API's reader) for a forced call; a
    ServeError (400) when max_tokens cannot hold the shortest call."""
    spec = CallSpec(parser, names, parallel)
    if max_tokens < spec.name_need:
        raise ServeError(f"max_tokens: a forced tool call needs at least {spec.name_need} "
                         f"tokens here, got {max_tokens}", param="max_tokens")
    table = token_symbols(tokenizer, eos)
    opener = list(tokenizer(spec.opener, add_special_tokens=False)["input_ids"])
    return opener, ToolConstraint(spec, table, max_tokens), CallReader(spec, table)
