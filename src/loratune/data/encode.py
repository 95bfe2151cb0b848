"""Tokenize a conversation with its chat template; label only what the model should learn."""

from __future__ import annotations

from dataclasses import dataclass

from loratune.data.formats import DataError

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def _render(tokenizer, messages, template, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def answer_spans(tokenizer, messages: list[dict], template: str) -> tuple[str, list[tuple[int, int]]]:
    """Rendered text and the character spans of every assistant answer (with its end marker)."""
    full = _render(tokenizer, messages, template, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start_text = _render(tokenizer, messages[:i], template, True)
        end_text = _render(tokenizer, messages[: i + 1], template, False)
        if not (full.startswith(start_text) and full.startswith(end_text)):
            raise DataError("the chat template does not render conversations prefix by prefix; "
                            "use train_on: all or a named template")
        end = len(end_text.rstrip())  # the newline after an end-of-turn marker is not taught
        spans.append((len(start_text), end))
    return full, spans


def encode_conversation(messages: list[dict], tokenizer, template: str,
                        train_on: str = "answers", max_length: int = 2048,
                        overflow: str = "truncate") -> tuple[Example | None, bool]:
    """Return (example or None if dropped, whether it was cut to max_length)."""
    text, spans = answer_spans(tokenizer, messages, template)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if train_on == "all":
        labels = list(ids)
    else:
        labels = [tok if any(s <= a < e for s, e in spans) else IGNORE
                  for tok, (a, _) in zip(ids, offsets)]
    eos = tokenizer.eos_token_id
    # The model must learn to stop: the answer ends with eos even when pad == eos.
    taught = [label for label in labels if label != IGNORE]
    if eos is not None and taught and taught[-1] != eos:
        ids, labels = ids + [eos], labels + [eos]
    truncated = len(ids) > max_length
    if truncated:
        if overflow == "drop":
            return None, True
        ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE for label in labels[1:]):
        return None, truncated
    return Example(ids, labels), truncated
