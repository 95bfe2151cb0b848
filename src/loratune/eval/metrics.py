"""Answer comparison for held-out evaluation."""

from __future__ import annotations

import re

# End-of-turn markers a decoder may leave in text when special tokens are not skipped.
_TRAILING_MARKERS = re.compile(r"(\s*(<\|im_end\|>|<\|endoftext\|>|</s>|<\|eot_id\|>))+\s*$")


def normalize_answer(text: str) -> str:
    return _TRAILING_MARKERS.sub("", text).strip()


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


def accuracy(predictions: list[str], references: list[str]) -> float:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    return sum(map(exact_match, predictions, references)) / max(len(references), 1)
