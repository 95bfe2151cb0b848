"""Data: file formats, chat templates, answer-only labels, packing."""

from loratune.data.dataset import DataStats, build_examples, load_conversations, split_heldout
from loratune.data.encode import IGNORE, Example, encode_conversation
from loratune.data.formats import DataError, detect_format, read_records, to_messages
from loratune.data.packing import batches, collate, pack_examples, should_pack
from loratune.data.templates import TEMPLATES, resolve_template

__all__ = [
    "IGNORE", "TEMPLATES", "DataError", "DataStats", "Example", "batches", "build_examples",
    "collate", "detect_format", "encode_conversation", "load_conversations", "pack_examples",
    "read_records", "resolve_template", "should_pack", "split_heldout", "to_messages",
]
