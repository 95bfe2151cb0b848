"""The training loop's data when data.train is streamed (data.streaming): micro-batches taken
in order from a BatchStream, and its position kept in every checkpoint, so that a run killed
mid-epoch resumes on the batch it would have seen next.

The length of a streamed file is not known before it is read, so train.max_steps sets the run's
length (the schedule and the progress bar need it); an epoch ends when the file does and the
next reads it again. The progress bar shows the tokens seen so far.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from loratune import data as lt_data
from loratune.config import RunConfig
from loratune.data.batch_stream import BatchStream
from loratune.data.errors import DataError
from loratune.data.hf_datasets import held_out_config

POSITION_KEY = "data_position"  # in trainer_state.json


@dataclass
class StreamTrainData:
    """Micro-batches of a streamed file, read in step order, and held-out batches in memory."""

    cfg: RunConfig
    stream: BatchStream
    pad_id: int
    eval_batches: list[dict]
    streaming: ClassVar[bool] = True
    n_batches: int = field(default=0, init=False)  # unknown: train.max_steps sets the length
    next_step: int = field(default=0, init=False)

    @property
    def packing(self) -> bool:
        return self.stream.packing

    def micro_batches(self, step: int) -> list[dict]:
        """The train.grad_accum micro-batches of optimizer step `step`, the next one in order."""
        if step != self.next_step:
            raise RuntimeError(f"streamed data is read in step order: step {step} was asked "
                               f"for where step {self.next_step} comes next")
        self.next_step += 1
        return [self.stream.next_batch() for _ in range(self.cfg.train.grad_accum)]

    def checkpoint_state(self) -> dict:
        return {POSITION_KEY: self.stream.position()}

    def resume(self, state: dict, checkpoint: Path) -> None:
        """Continue from the position checkpoint `checkpoint` recorded after its step."""
        where = str(checkpoint / "trainer_state.json")
        if not isinstance(state.get(POSITION_KEY), dict):
            raise DataError(f"{where}: no {POSITION_KEY}: the checkpoint was written by a run "
                            "that read data.train whole; resume with data.streaming: false")
        self.stream.restore(state[POSITION_KEY], where)
        self.next_step = state["step"]


def check_streaming(cfg: RunConfig, why: str) -> None:
    """What a streamed run needs: a length in steps, and held-out data of its own."""
    if cfg.train.objective != "sft":
        raise ValueError(f"data.train is streamed ({why}); streaming reads SFT and text data, "
                         f"train.objective: {cfg.train.objective} reads its pairs whole: set "
                         "data.streaming: false")
    if cfg.train.max_steps is None:
        raise ValueError(f"data.train is streamed ({why}), so its length is not known before "
                         "the run: set train.max_steps (epochs end when the data does)")
    if cfg.data.eval_fraction:
        raise ValueError(f"data.train is streamed ({why}): data.eval_fraction needs the whole "
                         "file to hold out a share; give held-out data as data.eval")


def setup_stream_data(cfg: RunConfig, tokenizer, paths: tuple[str, str | None], why: str,
                      packing: bool | str, log) -> StreamTrainData:
    """The stream of data.train (its first window read now: a bad record there stops the run
    before the model trains) and data.eval read whole."""
    check_streaming(cfg, why)
    train_path, eval_path = paths
    pad_id = tokenizer.pad_token_id
    stream = BatchStream(train_path, tokenizer, cfg.data, cfg.train.batch_size, packing, pad_id,
                         cfg.train.seed)
    eval_ex, eval_batches = [], []
    if eval_path:
        eval_ex, _ = lt_data.build_examples(eval_path, tokenizer, held_out_config(cfg.data))
        eval_batches = lt_data.batches(eval_ex, cfg.train.batch_size, cfg.data.max_length,
                                       stream.packing, pad_id, cfg.train.seed, 0)
    stats = stream.stats
    log(f"data: streaming {train_path} ({why}): windows of data.shuffle_buffer="
        f"{cfg.data.shuffle_buffer} records, packing={'on' if stream.packing else 'off'}; first "
        f"window: {stats.n_records} records ({stats.format}), {stats.n_tokens} tokens, "
        f"{stats.n_truncated} truncated, {stats.dropped()}; epochs end when the data does; "
        f"held-out: {len(eval_ex)}{stats.noted()}")
    return StreamTrainData(cfg, stream, pad_id, eval_batches)
