"""From a data file to conversations or tokenized examples, with counts of what was cut."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from itertools import islice
from dataclasses import dataclass, field
from pathlib import Path

from loratune.config import DataConfig
from loratune.data.conversation import fit_conversation
from loratune.data.encode import IGNORE, Encoded, Example, encode_conversation, user_turn_pieces
from loratune.data.errors import DataError
from loratune.data.formats import detect_format, to_messages
from loratune.data.hf_datasets import iter_records
from loratune.data.images import image_rules, vision_messages
from loratune.data.templates import resolve_template, template_note
from loratune.data.tools import fit_tools, has_tools, template_name, tool_conversation
from loratune.data.text import documents_ids, iter_documents, split_document


@dataclass
class DataStats:
    """What `build_examples` made of a file. Truncated examples are kept (cut to max_length);
    dropped records are not (overflow: drop, or no labelled token left)."""

    n_records: int = 0
    n_examples: int = 0
    n_truncated: int = 0
    n_dropped: int = 0
    n_tokens: int = 0
    n_label_tokens: int = 0  # tokens that carry loss (the first token of an example never does)
    format: str = ""  # alpaca, messages, sharegpt, or "mixed: a, b" for auto-detected mixes
    drop_reasons: dict[str, int] = field(default_factory=dict)  # why -> records dropped
    notes: dict[str, int] = field(default_factory=dict)  # what was changed to fit the template
    template_note: str | None = None  # the template chosen for a tokenizer that has none

    def why_dropped(self) -> str:
        """e.g. '2 with no answer tokens left after truncation to data.max_length=64'."""
        return ", ".join(f"{n} {reason}" for reason, n in self.drop_reasons.items())

    def dropped(self) -> str:
        """'N dropped', and why when any were: how the log line reports them."""
        return f"{self.n_dropped} dropped" + (f" ({self.why_dropped()})" if self.n_dropped else "")

    def noted(self) -> str:
        """e.g. '; note: 8 records: system message folded into ...' ('' when none)."""
        template = f"; note: {self.template_note}" if self.template_note else ""
        return template + "".join(f"; note: {n} records: {what}" for what, n in self.notes.items())


def _drop_reason(truncated: bool, cfg: DataConfig) -> str:
    """Why encode_conversation gave no example, in words a user can act on."""
    if truncated and cfg.overflow == "drop":
        return f"longer than data.max_length={cfg.max_length} (data.overflow: drop)"
    if truncated:
        return f"with no answer tokens left after truncation to data.max_length={cfg.max_length}"
    return "with no answer tokens to learn"


def _record_conversation(record: dict, fmt: str, where: str,
                         cfg: DataConfig) -> tuple[list[dict], list[dict]]:
    """(messages, declared tools) of one record; tools is [] for a conversation without any."""
    if not has_tools(record):
        return to_messages(record, fmt, None, where, cfg.system_prompt), []
    messages, tools = tool_conversation(record, fmt, where)
    if cfg.system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": cfg.system_prompt})
    return messages, tools


def _conversations(path: str | Path, cfg: DataConfig, formats: set[str],
                   left_out: dict[str, int] | None = None, skip: int = 0
                   ) -> Iterator[tuple[str, list[dict], list[dict]]]:
    """(where, messages, tools) for every record, as the data is read (a bad record stops the
    reading there); each record's format is added to `formats`, data.filter's refusals counted
    in `left_out`. The first `skip` records (after data.filter) are read, not converted."""
    if cfg.format == "text":
        raise DataError(f"{path}: data.format: text holds documents, not conversations; "
                        "score it with `loratune eval --task perplexity`")
    for n, (where, record) in enumerate(iter_records(str(path), cfg, left_out)):
        if n < skip:
            continue
        fmt = cfg.format
        if fmt == "auto":
            fmt = detect_format(record, where)
        formats.add(fmt)
        yield where, *_record_conversation(record, fmt, where, cfg)


def _format_name(formats: set[str]) -> str:
    seen = sorted(formats)
    return seen[0] if len(seen) == 1 else "mixed: " + ", ".join(seen)


def load_conversations(path: str | Path, cfg: DataConfig) -> list[list[dict]]:
    """Each record as OpenAI-style messages (the last one is the reference answer)."""
    return [messages for _, messages, _ in _conversations(path, cfg, set())]


def load_tool_conversations(path: str | Path, cfg: DataConfig) -> list[tuple[list[dict],
                                                                             list[dict]]]:
    """Each record as (messages, declared tools): what tool-use evaluation reads."""
    return [(messages, tools) for _, messages, tools in _conversations(path, cfg, set())]


def new_stats(tokenizer, cfg: DataConfig) -> DataStats:
    """Empty counts for reading a file as `cfg` says (the template note of an SFT file)."""
    if cfg.format == "text":
        return DataStats(format="text")
    return DataStats(template_note=template_note(tokenizer, cfg.template))


def no_examples(path: str | Path, stats: DataStats, cfg: DataConfig) -> DataError:
    """The error for a file that gave no example at all."""
    if cfg.format == "text":
        return DataError(f"{path}: no documents with text (data.format: text)")
    return DataError(f"{path}: no usable examples: all {stats.n_records} records were "
                     f"dropped ({stats.why_dropped()}){stats.noted()}")


def iter_examples(path: str | Path, tokenizer, cfg: DataConfig, stats: DataStats,
                  skip: int = 0) -> Iterator[list[Example]]:
    """The examples of each record (a document with data.format: text) in file order, as the
    file is read: [] for a dropped record. The first `skip` records are read but not encoded
    (a resumed stream, data/batch_stream.py); `stats` counts the encoded ones."""
    if cfg.format == "text":
        yield from _text_examples(path, tokenizer, cfg, stats, skip)
        return
    template = resolve_template(tokenizer, cfg.template)
    formats: set[str] = set()
    for where, messages, tools in _conversations(path, cfg, formats, stats.notes, skip):
        stats.n_records += 1
        examples = _encode_record(where, messages, tools, tokenizer, template, cfg, stats)
        stats.format = _format_name(formats)
        yield examples


def _encode_record(where: str, messages: list[dict], tools: list[dict], tokenizer,
                   template: str, cfg: DataConfig, stats: DataStats) -> list[Example]:
    """One conversation's examples ([]: dropped, counted in `stats` with why); more than one
    where the template needs a tool conversation split by user turn."""
    try:
        if tools or any(m["role"] == "tool" for m in messages):
            messages, tools = fit_tools(messages, tools, template,
                                        template_name(tokenizer, cfg.template))
        messages, notes = fit_conversation(messages, tokenizer, template, cfg.think)
        for note in notes:
            stats.notes[note] = stats.notes.get(note, 0) + 1
        encoded = _encode_pieces(messages, tools, tokenizer, template, cfg, stats)
    except DataError as err:
        raise DataError(f"{where}: {err}") from None
    examples = [ex for ex, _ in encoded if ex is not None]
    if not examples:
        stats.n_dropped += 1
        reason = _drop_reason(any(cut for _, cut in encoded), cfg)
        stats.drop_reasons[reason] = stats.drop_reasons.get(reason, 0) + 1
        return []
    stats.n_truncated += any(cut for ex, cut in encoded if ex is not None)
    for example in examples:
        stats.n_tokens += len(example)
        stats.n_label_tokens += sum(label != IGNORE for label in example.labels[1:])
    return examples


def _encode_pieces(messages: list[dict], tools: list[dict], tokenizer, template: str,
                   cfg: DataConfig, stats: DataStats) -> list[Encoded]:
    """The conversation encoded whole, or one piece per user turn where the template declares
    tools before the last user turn only (encode.user_turn_pieces), noted with how many."""
    pieces = [(messages, 0)]
    if cfg.train_on == "answers":
        pieces = user_turn_pieces(messages, tokenizer, template, tools)
    if len(pieces) > 1:
        note = (f"split into {len(pieces)} examples, one per user turn (the chat template "
                "declares the tools before the last user turn only)")
        stats.notes[note] = stats.notes.get(note, 0) + 1
    return [encode_conversation(piece, tokenizer, template, cfg.train_on, cfg.max_length,
                                cfg.overflow, tools, first) for piece, first in pieces]


TEXT_BATCH = 64  # documents per tokenizer call (data.format: text)


def _text_examples(path: str | Path, tokenizer, cfg: DataConfig, stats: DataStats,
                   skip: int) -> Iterator[list[Example]]:
    """`data.format: text`: every document of a file or folder as pieces of at most
    max_length tokens, every token labelled (data/text.py); tokenized TEXT_BATCH at a time."""
    documents = islice(iter_documents(path, cfg), skip, None)
    while chunk := [text for _, text in islice(documents, TEXT_BATCH)]:
        for ids in documents_ids(chunk, tokenizer):
            yield _document_pieces(ids, cfg, stats)


def _document_pieces(ids: list[int], cfg: DataConfig, stats: DataStats) -> list[Example]:
    stats.n_records += 1
    pieces = split_document(ids, cfg.max_length)
    if len(pieces) > 1:
        split = f"split into pieces of data.max_length={cfg.max_length} (one token overlap)"
        stats.notes[split] = stats.notes.get(split, 0) + 1
    for piece in pieces:
        stats.n_tokens += len(piece)
        stats.n_label_tokens += len(piece) - 1
    return pieces


def build_examples(path: str | Path, tokenizer,
                   cfg: DataConfig) -> tuple[list[Example], DataStats]:
    """Tokenized, labelled examples of a data file, and counts of what happened to them."""
    stats = new_stats(tokenizer, cfg)
    examples = [ex for pieces in iter_examples(path, tokenizer, cfg, stats) for ex in pieces]
    stats.n_examples = len(examples)
    if not examples:
        raise no_examples(path, stats, cfg)
    return examples, stats


def build_image_examples(path: str | Path, cfg: DataConfig,
                         encode: Callable) -> tuple[list[Example], DataStats]:
    """The image conversations of a data file (data/images.py reads their images) as examples
    made by `encode(messages, images)`, the vision model's encoder (models/vision.py; data/ does
    not import models/): None from it drops the record (longer than data.max_length)."""
    if cfg.format not in ("auto", "messages", "sharegpt"):
        raise DataError(f"{path}: data.format: {cfg.format} with a vision-language model; image "
                        "data is read as messages or sharegpt (use auto)")
    stats, rules, examples = DataStats(format="messages with images"), image_rules(cfg), []
    for where, record in iter_records(str(path), cfg, stats.notes):
        stats.n_records += 1
        messages, images = vision_messages(record, *_source_index(where), rules)
        try:
            example = encode(messages, images)
        except DataError as err:
            raise DataError(f"{where}: {err}") from None
        if example is None:
            stats.n_dropped += 1
            reason = f"longer than data.max_length={cfg.max_length} (images are not cut)"
            stats.drop_reasons[reason] = stats.drop_reasons.get(reason, 0) + 1
            continue
        examples.append(example)
        stats.n_tokens += len(example)
        stats.n_label_tokens += sum(label != IGNORE for label in example.labels[1:])
    stats.n_examples = len(examples)
    if not examples:
        raise no_examples(path, stats, cfg)
    return examples, stats


def read_image_conversations(path: str | Path, cfg: DataConfig) -> list[tuple[str, list, list]]:
    """(where, messages, PIL images) of each image conversation in a data file, read as
    training reads them (eval --task vqa encodes them with the model it scores)."""
    rules = image_rules(cfg)
    return [(where, *vision_messages(record, *_source_index(where), rules))
            for where, record in iter_records(str(path), cfg)]


def _source_index(where: str) -> tuple[str, int | None]:
    """('file.jsonl', 12) from iter_records' 'file.jsonl:12' (or 'file.json[3]'): the file
    relative image paths are read from, and the record named in image errors."""
    if where.endswith("]") and "[" in where:
        source, _, index = where[:-1].rpartition("[")
    else:
        source, _, index = where.rpartition(":")
    return (source, int(index)) if source and index.isdigit() else (where, None)


def split_heldout(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out): round(fraction * n) items held out (at least 1 when fraction > 0),
    chosen by seed; both keep the input order."""
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"data.eval_fraction is {fraction}; expected 0 <= fraction < 1")
    if fraction == 0.0:
        return list(items), []
    k = max(1, round(fraction * len(items)))
    if k >= len(items):
        raise DataError(f"data.eval_fraction={fraction} of {len(items)} examples leaves none "
                        "to train on")
    held = set(random.Random(seed).sample(range(len(items)), k))
    return ([x for i, x in enumerate(items) if i not in held],
            [x for i, x in enumerate(items) if i in held])
