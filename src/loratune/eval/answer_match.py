"""Answer comparison for held-out evaluation."""

from __future__ import annotations

import re

# End-of-turn markers a decoder may leave in text when special tokens are not skipped;
# everything from the first one on (e.g. "<|im_end|>\n<|im_start|>user ...") is dropped.
_END_MARKERS = re.compile(r"<\|im_end\|>|<\|endoftext\|>|<\|eot_id\|>|<\|end\|>|</s>")


def normalize_answer(text: str) -> str:
    """The answer without surrounding whitespace or anything from an end-of-turn marker on."""
    return _END_MARKERS.split(text, maxsplit=1)[0].strip()


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


def accuracy(predictions: list[str], references: list[str]) -> float:
    """Fraction of exact matches (0.0 for no items)."""
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    return sum(map(exact_match, predictions, references)) / max(len(references), 1)
