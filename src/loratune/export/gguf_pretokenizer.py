"""Which llama.cpp pre-tokenizer (`tokenizer.ggml.pre`) reproduces a tokenizer.json's splitting.

llama.cpp picks the regexes that cut text into words before BPE by a name stored in the GGUF.
Its converter finds that name by hashing the token ids of a fixed text, which only recognises
tokenizers it has seen. Here the name is found by behaviour instead: the tokenizer's own
pre-tokenizer cuts probe texts, and each llama.cpp pre-tokenizer's regexes (as llama.cpp's
`llama-vocab.cpp` applies them: each regex in turn splits every piece into matches and the
gaps between them) must cut them the same way. That works for any vocabulary, trained or random.
"""

from __future__ import annotations

from pathlib import Path

import regex

_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CASED_WORD = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
               r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+"
               r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?")

# llama.cpp's name -> the regexes it applies, in order (the patterns its tokenizers were trained
# with). First match wins, so names that share regexes are listed once, most common first.
CANDIDATES: dict[str, list[str]] = {
    "llama-bpe": [_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+"],                        # Llama 3.x
    "qwen2": [_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+"],                            # Qwen2.5, Qwen3
    "qwen35": [_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+"
               r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "gpt-4o": [_CASED_WORD + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "tekken": [_CASED_WORD.replace("(?i:'s|'t|'re|'ve|'m|'ll|'d)?", "")
               + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "smollm": [r"\p{N}", _GPT2],                                       # SmolLM, StarCoder
    "gpt-2": [_GPT2],
}

# Probe texts: contractions in both cases, digit runs of every length, whitespace and newline
# runs, punctuation runs, case changes inside words, combining marks, several scripts, emoji.
PROBES = (
    "Hello World! It's 2024: we'VE got 1 22 333 4444 55555 1234567 items...",
    "\n\n\tTabs  and   spaces   \r\n  \n    indented\n\n\n   end  ",
    "CamelCaseWord HTTPServer iPhone naïve café e\u0301te ÉCOLE straße",
    "“quotes” ''' ``` --- === !!!??? (parens) [x] {y} <tag/> a+b=c 3.14 3..4 path/to/file",
    "你好，世界！こんにちは 한국어 Привет мир 🚀🦙 ✅ I'd've you'll He's O'Neil DON'T",
)


def split_like_llamacpp(text: str, exprs: list[str]) -> list[str]:
    """The pieces llama.cpp's regex pre-tokenizer cuts `text` into."""
    pieces = [text]
    for expr in exprs:
        pattern = regex.compile(expr)
        out = []
        for piece in pieces:
            pos = 0
            for m in pattern.finditer(piece):
                if m.start() > pos:
                    out.append(piece[pos:m.start()])
                if m.end() > m.start():
                    out.append(m.group())
                pos = m.end()
            if pos < len(piece):
                out.append(piece[pos:])
        pieces = out
    return pieces


def split_like_tokenizer(pre_tokenizer, text: str) -> list[str]:
    """The pieces a `tokenizers` pre-tokenizer cuts `text` into, as substrings of `text`."""
    return [text[a:b] for _, (a, b) in pre_tokenizer.pre_tokenize_str(text)]


def detect_pre(tokenizer_json: Path) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json, or a ValueError naming
    the file and the first probe text no known pre-tokenizer cuts the same way."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    normalizer = tok.normalizer
    if normalizer is not None and type(normalizer).__name__ != "NFC":
        raise ValueError(f"{tokenizer_json}: a byte-level BPE tokenizer with a "
                         f"{type(normalizer).__name__} normalizer has no llama.cpp "
                         "pre-tokenizer; pass --tokenizer-pre to choose one anyway")
    if tok.pre_tokenizer is None:
        raise ValueError(f"{tokenizer_json}: no pre_tokenizer; llama.cpp's byte-level BPE "
                         "always splits words first (pass --tokenizer-pre to choose one anyway)")
    # Qwen's NFC normalizer: llama.cpp does not normalize, so the two agree on NFC text (what
    # the probes are compared on)
    probes = [normalizer.normalize_str(t) if normalizer else t for t in PROBES]
    ours = [split_like_tokenizer(tok.pre_tokenizer, t) for t in probes]
    for name, exprs in CANDIDATES.items():
        if all(split_like_llamacpp(t, exprs) == want for t, want in zip(probes, ours)):
            return name
    raise ValueError(f"{tokenizer_json}: its pre-tokenizer splits text like none of llama.cpp's "
                     f"known ones ({', '.join(CANDIDATES)}), e.g. {probes[0]!r} -> {ours[0]}; "
                     "pass --tokenizer-pre NAME to choose one anyway")
