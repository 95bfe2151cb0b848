"""Training batches streamed from a file too big to keep (`data.streaming`), with a position
that a checkpoint records, so that a killed run resumes on exactly the batch it would have
seen next.

Records are read, encoded and shuffled a window at a time: `data.shuffle_buffer` records are
read, their examples packed and ordered as the in-memory path orders a whole epoch
(packing.epoch_rows, seeded by seed, epoch and window index), and their rows handed out
`batch_size` at a time; a batch may take the last rows of one window and the first of the
next. Window 0 of an epoch is seeded as the in-memory epoch is, so a window that holds the
whole file gives the in-memory batches, step for step. An epoch ends when the file does (its
last batch may be smaller, as in memory); the next one reads the file again.

Memory holds one window of examples and its rows, whatever the file's size. The position is
four integers (`StreamPosition`): the epoch, the window's index and first record, and the rows
of it already used. A window is a pure function of its records and the seed, so resuming
re-reads the file up to that record without encoding it, then reads and packs that one window
again: no buffered record or packer state needs saving.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path

import torch

from loratune.config import DataConfig
from loratune.data.dataset import DataStats, iter_examples, new_stats, no_examples
from loratune.data.encode import Example
from loratune.data.errors import DataError
from loratune.data.hf_datasets import is_glob
from loratune.data.packing import collate, epoch_rows, should_pack

MB = 2**20
CHECKED = ("source", "format", "max_length", "shuffle_buffer")  # must match on resume


def source_mb(spec: str) -> float | None:
    """Size on disk of a file, a glob's files or a folder's files in MB; None for a name that
    is none of these (a Hub id, 'demo')."""
    path = Path(spec)
    if is_glob(spec):
        files = [Path(f) for f in glob.glob(spec, recursive=True)]
    elif path.is_dir():
        files = list(path.rglob("*"))
    elif path.is_file():
        files = [path]
    else:
        return None
    return sum(f.stat().st_size for f in files if f.is_file()) / MB


def streaming_reason(cfg: DataConfig, spec: str) -> str | None:
    """Why data.train is streamed (the line that announces it), or None when it is read whole."""
    if cfg.streaming is False:
        return None
    if cfg.streaming is True:
        return "data.streaming: true"
    size = source_mb(spec)
    if size is None or size <= cfg.streaming_threshold_mb:
        return None
    return (f"{spec} is {size:,.0f} MB, above data.streaming_threshold_mb="
            f"{cfg.streaming_threshold_mb:g}")


@dataclass
class StreamPosition:
    """Where a stream stands between two batches; `record()` is its JSON in a checkpoint."""

    epoch: int = 0
    window: int = 0  # index of the current window in its epoch
    start: int = 0   # records of the epoch read before the current window
    used: int = 0    # rows of the current window already batched

    @classmethod
    def from_record(cls, record: dict, where: str) -> StreamPosition:
        values = {k: record.get(k) for k in asdict(cls())}
        # bool is an int to Python, but `true` in the JSON is no count of records or rows
        bad = [k for k, v in values.items()
               if not isinstance(v, int) or isinstance(v, bool) or v < 0]
        if bad:
            raise DataError(f"{where}: data position field {', '.join(bad)} is not a "
                            "non-negative integer; the checkpoint is damaged")
        return cls(**values)


class BatchStream:
    """Collated training batches of `spec`, one after another over epochs, from `position`."""

    def __init__(self, spec: str, tokenizer, cfg: DataConfig, batch_size: int,
                 packing: bool | str, pad_id: int, seed: int):
        self.spec, self.tokenizer, self.cfg = spec, tokenizer, cfg
        self.batch_size, self.pad_id, self.seed = batch_size, pad_id, seed
        self.stats: DataStats = new_stats(tokenizer, cfg)
        self.pos = StreamPosition()
        self._rows: list[list[Example]] = []
        self._read = 0  # records in the current window
        self._empty_epoch = True  # no row yet since this epoch began
        self._open(self.pos, packing)

    # ------------------------------------------------------------------ reading windows

    def _open(self, pos: StreamPosition, packing: bool | str) -> None:
        """Read from record pos.start of epoch pos.epoch: the window there, rows pos.used on."""
        self.pos = StreamPosition(**asdict(pos))
        self._records: Iterator[list[Example]] = iter_examples(
            self.spec, self.tokenizer, self.cfg, self.stats, skip=pos.start)
        examples = self._window_examples()
        if packing == "auto":  # decided on the first window, as in memory on the whole file
            packing = should_pack(examples, self.cfg.max_length, self.batch_size)
        self.packing = bool(packing)
        self._pack(examples)
        self._check_window(pos)
        if not self._read and pos.start and not self._has_record(pos.start - 1):
            raise DataError(f"{self.spec}: the data position (epoch {pos.epoch}, record "
                            f"{pos.start}) is past the file, which holds fewer records: the "
                            "data file changed since the checkpoint, or the checkpoint is damaged")
        if pos.used > len(self._rows):
            raise DataError(f"{self.spec}: the data position (epoch {pos.epoch}, window "
                            f"{pos.window}, row {pos.used}) is past the window's "
                            f"{len(self._rows)} rows: the data file changed since the checkpoint")
        self.pos.used = pos.used

    def _check_window(self, pos: StreamPosition) -> None:
        """Window w starts at record w·shuffle_buffer (the file's end: earlier, in an empty
        window); another window would seed another order, silently."""
        size = self.cfg.shuffle_buffer
        at_end = not self._read and (pos.window - 1) * size < pos.start < pos.window * size
        if pos.start != pos.window * size and not at_end:
            raise DataError(f"{self.spec}: the data position's window {pos.window} cannot start "
                            f"at record {pos.start} (windows of data.shuffle_buffer={size} "
                            "records): the checkpoint is damaged")

    def _has_record(self, index: int) -> bool:
        """Whether the file holds a record `index` (0-based): an empty window at `start` is the
        end of the file only when record start-1 exists (epoch_done() stops there)."""
        later = iter_examples(self.spec, self.tokenizer, self.cfg,
                              new_stats(self.tokenizer, self.cfg), skip=index)
        return next(later, None) is not None

    def _window_examples(self) -> list[Example]:
        self._rows = []  # the last window's rows go before the next is read: one in memory
        examples, self._read = [], 0
        for pieces in islice(self._records, self.cfg.shuffle_buffer):
            self._read += 1
            examples.extend(pieces)
        return examples

    def _pack(self, examples: list[Example]) -> None:
        self._rows = epoch_rows(examples, self.cfg.max_length, self.packing, self.seed,
                                self.pos.epoch, self.pos.window) if examples else []

    def _next_window(self) -> None:
        self.pos = StreamPosition(self.pos.epoch, self.pos.window + 1,
                                  self.pos.start + self._read, 0)
        self._pack(self._window_examples())

    def _next_epoch(self) -> None:
        if self._empty_epoch:
            raise no_examples(self.spec, self.stats, self.cfg)
        self._empty_epoch = True
        self._open(StreamPosition(self.pos.epoch + 1), self.packing)

    # ------------------------------------------------------------------------ batches

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next micro-batch; the last of an epoch may hold fewer rows."""
        rows: list[list[Example]] = []
        while len(rows) < self.batch_size:
            if self.pos.used < len(self._rows):
                take = self._rows[self.pos.used:self.pos.used + self.batch_size - len(rows)]
                rows += take
                self.pos.used += len(take)
                self._empty_epoch = False
            elif self._read:
                self._next_window()
            elif rows:  # the file is used up: the epoch's last batch
                break
            else:
                self._next_epoch()
        return collate(rows, self.pad_id, self.packing)

    def epoch_done(self) -> bool:
        """Whether the current epoch has no batch left (reads the next window to know)."""
        while self.pos.used >= len(self._rows) and self._read:
            self._next_window()
        return self.pos.used >= len(self._rows)

    # ------------------------------------------------------------------------ position

    def position(self) -> dict:
        """The JSON a checkpoint keeps: the position and what must match to resume there."""
        return {**asdict(self.pos), "packing": self.packing, "source": str(self.spec),
                "format": self.cfg.format, "max_length": self.cfg.max_length,
                "shuffle_buffer": self.cfg.shuffle_buffer}

    def restore(self, record: dict, where: str) -> None:
        """Continue from a checkpoint's `position()`; refused when the data settings differ."""
        ours = self.position()
        wrong = [f"{k}: checkpoint {record.get(k)!r}, now {ours[k]!r}"
                 for k in CHECKED if record.get(k) != ours[k]]
        if wrong:
            raise DataError(f"{where}: the streamed data differs from the checkpoint's "
                            f"({'; '.join(wrong)}); resume with the same data settings or "
                            "start over with --overwrite")
        if not isinstance(record.get("packing"), bool):
            raise DataError(f"{where}: data position field packing is not true/false; the "
                            "checkpoint is damaged")
        self._empty_epoch = False
        self._open(StreamPosition.from_record(record, where), record["packing"])
