"""Data: file formats, chat templates, answer-only labels, packing."""

from loratune.data.dataset import DataStats, build_examples, load_conversations, split_heldout
from loratune.data.encode import IGNORE, Encoded, Example, answer_spans, encode_conversation
from loratune.data.errors import DataError
from loratune.data.formats import (
    detect_format,
    iter_indexed,
    locate,
    read_indexed,
    read_records,
    to_messages,
)
from loratune.data.packing import (
    batches,
    collate,
    epoch_rows,
    pack_examples,
    padding_share,
    should_pack,
)
from loratune.data.templates import TEMPLATES, resolve_template

__all__ = [
    "IGNORE", "TEMPLATES", "DataError", "DataStats", "Encoded", "Example", "answer_spans",
    "batches", "build_examples", "collate", "detect_format", "encode_conversation", "epoch_rows",
    "iter_indexed", "load_conversations", "locate", "pack_examples", "padding_share",
    "read_indexed", "read_records", "resolve_template", "should_pack", "split_heldout", "to_messages",
]
