"""Tokenize a conversation with its chat template; label only what the model should learn.

Answer spans are found in characters, then mapped to tokens with the tokenizer's offsets.
Assistant turn i starts where the template's prompt for it ends (turns < i with the
generation prompt, which must be a prefix of the whole conversation's text) and ends with the
end-of-turn token the template writes right after the answer (`<|im_end|>`, `<|eot_id|>`,
`</s>`, `<end_of_turn>`, `<|end|>`): the model learns to stop. Where the answer's text ends is
found by rendering the whole conversation again with a marker after that answer, so templates
that render earlier turns differently once later ones follow (Qwen3 drops the think blocks of
past answers; Phi-3 ends the conversation with eos) are read as they render the whole.
The tokenizer's eos ends every example, labelled (appended when the template does not write it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from loratune.data.conversation import render
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


@dataclass
class ImageExample(Example):
    """An example of a vision-language model: its tokens (each image's placeholder widened to
    the image's token count, never labelled) and the image tensors its processor made
    (Qwen2.5-VL: pixel_values, image_grid_thw). Rows of these are padded, never packed."""

    image_inputs: dict = field(default_factory=dict)


class Encoded(NamedTuple):
    """What `encode_conversation` returns: the example (None when dropped) and whether the
    conversation was longer than max_length."""

    example: Example | None
    truncated: bool


# An answer marker no template adds, trims or escapes (U+2063 INVISIBLE SEPARATOR).
_MARK = "\u2063\u2063\u2063"


def _render_or_refuse(tokenizer, messages: list[dict], template: str,
                      tools: list[dict] | None = None) -> str:
    """The whole conversation's text; what the template refuses is a DataError, not a jinja
    traceback."""
    try:
        return render(tokenizer, messages, template, False, tools)
    except Exception as err:  # jinja's TemplateError (raise_exception), or what a template trips
        raise DataError(f"the chat template refused the conversation: {err}") from None


def _not_prefix(i: int, why: str) -> DataError:
    return DataError(f"the chat template does not render conversations prefix by prefix "
                     f"(assistant turn {i}: {why}), so answers cannot be located; set "
                     f"data.train_on: all, or data.template to one of the named templates")


def _call_end(messages: list[dict], i: int, tokenizer, template: str, full: str,
              tools: list[dict] | None, ends: list[str]) -> int:
    """Where assistant turn i, which makes tool calls, ends in `full`, end-of-turn token
    included. Templates write calls after (or instead of) the content, so the marker goes in
    the last call's name; the turn ends at the first end-of-turn token after it."""
    marked = [dict(m) for m in messages]
    calls = [dict(c, function=dict(c["function"])) for c in messages[i]["tool_calls"]]
    calls[-1]["function"]["name"] += _MARK
    marked[i]["tool_calls"] = calls
    text = render(tokenizer, marked, template, False, tools)
    at = text.find(_MARK)
    after = text[at + len(_MARK):]
    if at < 0 or _MARK in after or not full.endswith(after):
        raise _not_prefix(i, "its tool calls are not rendered as given")
    where = len(full) - len(after)
    found = [(full.find(t, where), t) for t in ends if full.find(t, where) >= 0]
    if not found:
        raise _not_prefix(i, "no end-of-turn token follows its tool calls")
    at, token = min(found)
    return at + len(token)


def _answer_end(messages: list[dict], i: int, tokenizer, template: str, full: str,
                tools: list[dict] | None = None) -> int:
    """Where assistant turn i's text ends in `full` (before its end-of-turn token)."""
    marked = [dict(m) for m in messages]
    marked[i]["content"] = _marked_content(messages[i]["content"])
    text = render(tokenizer, marked, template, False, tools)
    at = text.find(_MARK)
    after = text[at + len(_MARK):]
    if at < 0 or _MARK in after or not full.endswith(after):
        raise _not_prefix(i, "its answer text is not rendered as given")
    return len(full) - len(after)


def _marked_content(content):
    """The answer's content with the marker after its text: appended to a string, or, for
    content parts (templates that read every turn as parts, as Idefics3's), to the last text
    part (a text part of its own when the last part is not text)."""
    if isinstance(content, str):
        return f"{content}{_MARK}"
    parts = [dict(p) for p in content]
    if parts and parts[-1].get("type") == "text":
        parts[-1]["text"] = f"{parts[-1]['text']}{_MARK}"
        return parts
    return parts + [{"type": "text", "text": _MARK}]


def _end_tokens(tokenizer) -> list[str]:
    """Special tokens that may close a turn (longest first), bos excluded."""
    specials = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()
                if t.special}
    specials.add(tokenizer.eos_token or "")
    specials.discard(tokenizer.bos_token or "")
    specials.discard("")
    return sorted(specials, key=len, reverse=True)


def _with_end_marker(full: str, end: int, ends: list[str]) -> int:
    """`end` moved past the end-of-turn token written right after the answer (blanks between
    allowed, as Llama 2's " </s>"); unchanged when none follows."""
    rest = full[end:]
    gap = len(rest) - len(rest.lstrip())
    marker = next((t for t in ends if rest[gap:].startswith(t)), None)
    return end + gap + len(marker) if marker else end


def answer_spans(messages: list[dict], tokenizer, template: str,
                 tools: list[dict] | None = None,
                 first: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span [start, end) of every assistant turn
    from message `first` on (tool calls included), end-of-turn marker included; `tools`: the
    declared tools."""
    full = _render_or_refuse(tokenizer, messages, template, tools)
    ends = _end_tokens(tokenizer)
    spans = []
    for i, message in enumerate(messages):
        # An assistant turn that opens the conversation answers nothing (and templates cannot
        # render an empty prefix): it stays context, as turns before `first` do.
        if message["role"] != "assistant" or i == 0 or i < first:
            continue
        before = render(tokenizer, messages[:i], template, True, tools)
        if not full.startswith(before):
            raise _not_prefix(i, "its prompt is not the start of the whole conversation")
        if message.get("tool_calls"):
            end = _call_end(messages, i, tokenizer, template, full, tools, ends)
        else:
            end = _with_end_marker(full, _answer_end(messages, i, tokenizer, template, full,
                                                     tools), ends)
        if end < len(before):
            raise _not_prefix(i, "its answer ends before its prompt")
        spans.append((len(before), end))
    return full, spans


def user_turn_pieces(messages: list[dict], tokenizer, template: str,
                     tools: list[dict] | None) -> list[tuple[list[dict], int]]:
    """[(messages, first)]: the conversation whole (first 0), or, where the template declares
    the tools before the last user turn only (Mistral v0.3's [AVAILABLE_TOOLS]), one piece per
    user turn: the conversation up to the next user turn, to be taught from that turn on
    (`first`). Each piece renders as a conversation ending there does, so no answer is taught
    with the tools declared after its question."""
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not tools or len(users) < 2:
        return [(messages, 0)]
    full = _render_or_refuse(tokenizer, messages, template, tools)
    if full.startswith(render(tokenizer, messages[:users[0] + 1], template, True, tools)):
        return [(messages, 0)]
    ends = users[1:] + [len(messages)]
    return [(messages[:end], start) for start, end in zip(users, ends)
            if any(m["role"] == "assistant" for m in messages[start:end])]


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
                        overflow: str = "truncate", tools: list[dict] | None = None,
                        first: int = 0) -> Encoded:
    """Tokenize one conversation (ending with an assistant turn) into an Example.

    train_on="answers" labels every assistant turn with its end marker; "all" labels every
    token. If the rendered text does not end with the tokenizer's eos, eos is appended with a
    label. Longer than max_length: keep the first max_length tokens ("truncate") or drop.
    Dropped (example None): overflow="drop", or no labelled token left after truncation.
    `tools`: the tools a tool-use conversation declares (passed to the template); `first`:
    assistant turns before this message are context, not taught (a piece of
    `user_turn_pieces`).
    """
    if train_on not in TRAIN_ON:
        raise DataError(f"data.train_on is '{train_on}'; expected one of {', '.join(TRAIN_ON)}")
    if overflow not in OVERFLOW:
        raise DataError(f"data.overflow is '{overflow}'; expected one of {', '.join(OVERFLOW)}")
    if train_on == "answers":
        text, spans = answer_spans(messages, tokenizer, template, tools, first)
    else:
        text, spans = _render_or_refuse(tokenizer, messages, template, tools), []
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise DataError(f"{type(tokenizer).__name__} gives no character offsets; answer-only "
                        "labels need a fast (tokenizers-backed) tokenizer") from None
    ids = list(enc["input_ids"])
    labels = list(ids) if train_on == "all" else _label_answers(ids, enc["offset_mapping"], spans)
    eos, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    # The model must learn to stop; the label is set here, never derived from pad, so it
    # survives when pad == eos (and a final eos the template writes itself, as Phi-3's, is
    # labelled too).
    if eos_id is not None and not (eos and text.rstrip().endswith(eos)):
        ids.append(eos_id)
        labels.append(eos_id)
    elif eos_id is not None and ids and ids[-1] == eos_id:
        labels[-1] = eos_id
    truncated = len(ids) > max_length
    if truncated:
        if overflow == "drop":
            return Encoded(None, True)
        ids, labels = ids[:max_length], labels[:max_length]
    # labels[0] is never a target (nothing precedes it), so it does not count.
    if all(label == IGNORE for label in labels[1:]):
        return Encoded(None, truncated)
    return Encoded(Example(ids, labels), truncated)
