"""Tokenize a conversation with its chat template; label only what the model should learn.

Answer spans are found in characters, then mapped to tokens with the tokenizer's offsets:
the text before assistant turn i is the template's rendering of turns < i with the
generation prompt, and the turn ends where the rendering of turns <= i ends (minus trailing
whitespace). So the end-of-turn marker the template writes after an answer (`<|im_end|>`,
`</s>`) is inside the span and gets a label: the model learns to stop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from loratune.data.errors import DataError

IGNORE = -100  # label of a token that carries no loss (PyTorch cross_entropy ignore_index)
TRAIN_ON = ("answers", "all")
OVERFLOW = ("truncate", "drop")


@dataclass
class Example:
    """One tokenized sample; labels[i] is the target of input_ids[i] (HF convention: the loss
    shifts by one), IGNORE where there is no loss."""

    input_ids: list[int]
    labels: list[int]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(f"input_ids ({len(self.input_ids)}) and labels ({len(self.labels)}) "
                             "must have the same length")

    def __len__(self) -> int:
        return len(self.input_ids)


class Encoded(NamedTuple):
    """What `encode_conversation` returns: the example (None when dropped) and whether the
    conversation was longer than max_length."""

    example: Example | None
    truncated: bool


def _render(tokenizer, messages: list[dict], template: str, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def answer_spans(messages: list[dict], tokenizer,
                 template: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span [start, end) of every assistant turn,
    end-of-turn marker included."""
    full = _render(tokenizer, messages, template, False)
    spans = []
    for i, message in enumerate(messages):
        # An assistant turn that opens the conversation answers nothing (and templates cannot
        # render an empty prefix): it stays context.
        if message["role"] != "assistant" or i == 0:
            continue
        before = _render(tokenizer, messages[:i], template, True)
        through = _render(tokenizer, messages[: i + 1], template, False)
        if not (full.startswith(through) and through.startswith(before)):
            raise DataError(f"the chat template does not render conversations prefix by prefix "
                            f"(assistant turn {i}), so answers cannot be located; set "
                            f"data.train_on: all, or data.template to one of the named templates")
        # The newline a template puts after the end marker is not part of the answer.
        spans.append((len(before), len(through.rstrip())))
    return full, spans


def _label_answers(ids: list[int], offsets: list[tuple[int, int]],
                   spans: list[tuple[int, int]]) -> list[int]:
    labels = []
    for tok, (a, b) in zip(ids, offsets):
        b = max(b, a + 1)  # some tokenizers give zero-width offsets; count them as one char
        # A token that overlaps an answer at all is taught: a merge across the boundary (e.g.
        # " Hello" after a prompt ending in a space) must not drop the answer's first word.
        labels.append(tok if any(a < e and b > s for s, e in spans) else IGNORE)
    return labels


def encode_conversation(messages: list[dict], tokenizer, template: str,
                        train_on: str = "answers", max_length: int = 2048,
                        overflow: str = "truncate") -> Encoded:
    """Tokenize one conversation (ending with an assistant turn) into an Example.

    train_on="answers" labels every assistant turn with its end marker; "all" labels every
    token. If the rendered text does not end with the tokenizer's eos, eos is appended with a
    label. Longer than max_length: keep the first max_length tokens ("truncate") or drop.
    Dropped (example None): overflow="drop", or no labelled token left after truncation.
    """
    if train_on not in TRAIN_ON:
        raise DataError(f"data.train_on is '{train_on}'; expected one of {', '.join(TRAIN_ON)}")
    if overflow not in OVERFLOW:
        raise DataError(f"data.overflow is '{overflow}'; expected one of {', '.join(OVERFLOW)}")
    if train_on == "answers":
        text, spans = answer_spans(messages, tokenizer, template)
    else:
        text, spans = _render(tokenizer, messages, template, False), []
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise DataError(f"{type(tokenizer).__name__} gives no character offsets; answer-only "
                        "labels need a fast (tokenizers-backed) tokenizer") from None
    ids = list(enc["input_ids"])
    labels = list(ids) if train_on == "all" else _label_answers(ids, enc["offset_mapping"], spans)
    eos, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    # The model must learn to stop; the label is set here, never derived from pad, so it
    # survives when pad == eos.
    if eos_id is not None and not (eos and text.rstrip().endswith(eos)):
        ids.append(eos_id)
        labels.append(eos_id)
    truncated = len(ids) > max_length
    if truncated:
        if overflow == "drop":
            return Encoded(None, True)
        ids, labels = ids[:max_length], labels[:max_length]
    # labels[0] is never a target (nothing precedes it), so it does not count.
    if all(label == IGNORE for label in labels[1:]):
        return Encoded(None, truncated)
    return Encoded(Example(ids, labels), truncated)
