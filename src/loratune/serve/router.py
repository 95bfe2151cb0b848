"""Route `model: "auto"` requests to an adapter by the language of the last user message.

Detection is deliberately crude and cheap: it counts scripts, not words. Kana means Japanese,
Hangul means Korean, otherwise a share of Han (CJK ideograph) characters of at least
`threshold` among all letters means Chinese, and anything else is "en" (the fallback). A
language classifier would be slower than a forward pass of a small model and would still be
guessing on three-word prompts.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

_NAME = re.compile(r"^[A-Za-z0-9._:+-]+$")   # an adapter name, or a composition "a:0.7+b:0.3"


def _is_han(ch: str) -> bool:
    cp = ord(ch)
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2EBEF
            or 0xF900 <= cp <= 0xFAFF)


def _is_kana(ch: str) -> bool:
    return 0x3040 <= ord(ch) <= 0x30FF


def _is_hangul(ch: str) -> bool:
    cp = ord(ch)
    return 0xAC00 <= cp <= 0xD7AF or 0x1100 <= cp <= 0x11FF or 0x3130 <= cp <= 0x318F


def script_counts(text: str) -> dict[str, int]:
    """Letters of `text` by script: han, kana, hangul and other (Latin, Cyrillic, ...)."""
    counts = {"han": 0, "kana": 0, "hangul": 0, "other": 0}
    for ch in text:
        if _is_han(ch):
            counts["han"] += 1
        elif _is_kana(ch):
            counts["kana"] += 1
        elif _is_hangul(ch):
            counts["hangul"] += 1
        elif unicodedata.category(ch).startswith("L"):
            counts["other"] += 1
    return counts


def detect_language(text: str, threshold: float = 0.3) -> str:
    """"zh", "ja", "ko" or "en" (the fallback for everything else, including empty text).

    The Han share is taken over letters, so a Chinese question quoting an English term
    ("请解释LoRA的原理": 6 Han, 4 Latin letters, share 0.6) is still Chinese.
    """
    c = script_counts(text)
    cjk = c["han"] + c["kana"] + c["hangul"]
    letters = cjk + c["other"]
    if letters == 0 or cjk / letters < threshold:
        return "en"
    if c["kana"] > 0:
        return "ja"
    if c["hangul"] > c["han"]:
        return "ko"
    return "zh"


def last_user_text(messages: list[dict]) -> str:
    """Text of the last user message (content string or OpenAI text parts); "" if none."""
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
            return ""
    return ""


@dataclass
class LanguageRouter:
    """Language -> model field (adapter name, composition or base name).

    A language without a route goes to `default`, which is the base model when None.
    """

    routes: dict[str, str] = field(default_factory=dict)
    default: str | None = None
    threshold: float = 0.3

    @classmethod
    def parse(cls, spec: str, default: str | None = None) -> "LanguageRouter":
        """Read `--route zh=adapter_zh,en=adapter_en` (`*=name` sets the default)."""
        routes: dict[str, str] = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            lang, sep, target = (s.strip() for s in item.partition("="))
            if not sep or not lang or not target:
                raise ValueError(f"--route: expected lang=adapter, got {item!r} in {spec!r}")
            if not _NAME.match(target):
                raise ValueError(f"--route: {target!r} for {lang!r} is not an adapter name")
            if lang == "*":
                default = target
            else:
                routes[lang.lower()] = target
        if not routes and default is None:
            raise ValueError(f"--route: no lang=adapter pairs in {spec!r}")
        return cls(routes=routes, default=default)

    def language(self, text: str) -> str:
        return detect_language(text, self.threshold)

    def route(self, text: str, base_name: str) -> str:
        """The model field to use for `text`: its language's route, else default, else base."""
        return self.routes.get(self.language(text)) or self.default or base_name
