"""Streamed batches (data/batch_stream.py): the in-memory batches when one window holds the file,
every example once per epoch otherwise, and a position that resumes on the very next batch."""

import json

import pytest
import torch

from loratune.config import DataConfig
from loratune.data import DataError, batches, build_examples, should_pack
from loratune.data.batch_stream import BatchStream, source_mb, streaming_reason

WORDS = ["apple", "river", "stone", "cloud", "green", "metal", "piano", "tiger", "lemon",
         "candle", "forest", "rocket", "amber"]


@pytest.fixture
def sft_file(tmp_path):
    rows = [{"instruction": f"Repeat the word {w}" + " again" * (i % 4), "output": f"{w} " * i}
            for i, w in enumerate(WORDS, 1)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def text_file(tmp_path):
    docs = [" ".join(WORDS[i:] + WORDS[:i]) * (1 + i % 3) for i in range(len(WORDS))]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(docs) + "\n")
    return path


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _stream(path, tok, cfg, packing, batch_size=3, seed=7):
    return BatchStream(str(path), tok, cfg, batch_size, packing, tok.pad_token_id, seed)


@pytest.mark.parametrize("fmt,packing", [("auto", True), ("auto", False), ("text", True)])
def test_one_window_gives_the_in_memory_batches_over_epochs(sft_file, text_file, smol_tokenizer,
                                                            fmt, packing):
    path = text_file if fmt == "text" else sft_file
    cfg = DataConfig(train=str(path), format=fmt, max_length=64, shuffle_buffer=1000)
    examples, _ = build_examples(path, smol_tokenizer, cfg)
    memory = [b for epoch in range(3) for b in batches(examples, 3, 64, packing,
                                                       smol_tokenizer.pad_token_id, 7, epoch)]
    stream = _stream(path, smol_tokenizer, cfg, packing)
    streamed = [stream.next_batch() for _ in memory]
    assert all(_same(a, b) for a, b in zip(streamed, memory))
    assert stream.pos.epoch == 2


@pytest.mark.parametrize("max_length", [64, 200])
def test_auto_packing_is_decided_as_in_memory(sft_file, smol_tokenizer, max_length):
    cfg = DataConfig(train=str(sft_file), max_length=max_length, shuffle_buffer=1000)
    examples, _ = build_examples(sft_file, smol_tokenizer, cfg)
    expected = should_pack(examples, max_length, 3)
    assert expected is (max_length == 200)  # rows of several examples only fit in 200 tokens
    assert _stream(sft_file, smol_tokenizer, cfg, "auto").packing is expected


def _labels(batch) -> list[tuple[int, ...]]:
    """Each example's tokens, found by its position ids restarting at 0 (padding dropped)."""
    out = []
    for ids, pos, lab in zip(batch["input_ids"], batch["position_ids"], batch["labels"]):
        starts = [i for i, p in enumerate(pos.tolist()) if p == 0] + [len(pos)]
        for a, b in zip(starts, starts[1:]):
            if (lab[a:b] != -100).any():
                out.append(tuple(ids[a:b].tolist()))
    return out


def test_small_windows_give_every_example_once_per_epoch(sft_file, smol_tokenizer):
    cfg = DataConfig(train=str(sft_file), max_length=64, shuffle_buffer=4)
    examples, _ = build_examples(sft_file, smol_tokenizer, cfg)
    stream = _stream(sft_file, smol_tokenizer, cfg, True, batch_size=2)
    seen = []
    while stream.pos.epoch == 0:
        seen += _labels(stream.next_batch())
    # the first batch of epoch 1 was taken by the loop's last call
    epoch1_first = seen[-len(_labels(_stream(sft_file, smol_tokenizer, cfg, True, 2)
                                     .next_batch())):]
    epoch0 = seen[:len(seen) - len(epoch1_first)]
    assert sorted(epoch0) == sorted(tuple(ex.input_ids) for ex in examples)


@pytest.mark.parametrize("fmt", ["auto", "text"])
def test_a_restored_position_gives_the_same_next_batches(sft_file, text_file, smol_tokenizer,
                                                         fmt):
    path = text_file if fmt == "text" else sft_file
    cfg = DataConfig(train=str(path), format=fmt, max_length=48, shuffle_buffer=5)
    stream = _stream(path, smol_tokenizer, cfg, True, batch_size=2)
    positions, batches_seen = [], []
    for _ in range(30):  # several epochs of 3 windows, batches spanning windows
        positions.append(json.loads(json.dumps(stream.position())))
        batches_seen.append(stream.next_batch())
    assert stream.pos.epoch >= 2
    for k in range(0, 30, 3):
        again = _stream(path, smol_tokenizer, cfg, "auto", batch_size=2)
        again.restore(positions[k], "ckpt")
        assert all(_same(again.next_batch(), b) for b in batches_seen[k:k + 6]), k


def test_restore_refuses_other_data_settings(sft_file, smol_tokenizer):
    cfg = DataConfig(train=str(sft_file), max_length=64, shuffle_buffer=5)
    saved = _stream(sft_file, smol_tokenizer, cfg, True).position()
    other = _stream(sft_file, smol_tokenizer, cfg.model_copy(update={"shuffle_buffer": 6}), True)
    with pytest.raises(DataError, match="shuffle_buffer: checkpoint 5, now 6"):
        other.restore(saved, "ckpt/trainer_state.json")
    with pytest.raises(DataError, match="field window is not a non-negative integer"):
        _stream(sft_file, smol_tokenizer, cfg, True).restore({**saved, "window": "x"}, "ckpt")


def test_a_bad_record_is_named_at_its_line_when_its_window_is_read(tmp_path, smol_tokenizer):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"instruction": "a", "output": "b"}) + "\n"
    path.write_text(good * 6 + '{"instruction": "a"}\n' + good)
    cfg = DataConfig(train=str(path), max_length=64, shuffle_buffer=4)
    stream = _stream(path, smol_tokenizer, cfg, True, batch_size=1)  # window 0: lines 1-4
    with pytest.raises(DataError, match=f"{path}:7: missing required field 'output'"):
        for _ in range(8):
            stream.next_batch()


def test_streaming_is_chosen_by_size_or_by_the_setting(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"x" * (3 << 20))
    assert source_mb(str(path)) == pytest.approx(3.0)
    assert source_mb(str(tmp_path / "*.jsonl")) == pytest.approx(3.0)
    assert streaming_reason(DataConfig(streaming_threshold_mb=4), str(path)) is None
    assert streaming_reason(DataConfig(streaming_threshold_mb=2), str(path)) == \
        f"{path} is 3 MB, above data.streaming_threshold_mb=2"
    assert streaming_reason(DataConfig(streaming=False, streaming_threshold_mb=2),
                            str(path)) is None
    assert streaming_reason(DataConfig(streaming=True), "owner/name") == "data.streaming: true"


@pytest.mark.parametrize("batch_size", [2, 13])  # 13 records: ends mid-batch / on a batch end
def test_epoch_done_after_the_epochs_last_batch(sft_file, smol_tokenizer, batch_size):
    cfg = DataConfig(train=str(sft_file), max_length=64, shuffle_buffer=4)
    stream = _stream(sft_file, smol_tokenizer, cfg, False, batch_size=batch_size)
    n = 0
    while not stream.epoch_done():
        n += len(stream.next_batch()["input_ids"])
    assert n == len(WORDS) and stream.pos.epoch == 0
    stream.next_batch()
    assert stream.pos.epoch == 1


def test_memory_holds_one_window_not_two(tmp_path, smol_tokenizer):
    """Reading window k+1 must not keep window k's rows alive (peak ~ one window)."""
    import tracemalloc

    path = tmp_path / "big.txt"
    path.write_text("\n\n".join(" ".join(WORDS[i % 13:] * 6) for i in range(600)) + "\n")
    cfg = DataConfig(train=str(path), format="text", max_length=128, shuffle_buffer=200)
    tracemalloc.start()
    try:
        stream = _stream(path, smol_tokenizer, cfg, True, batch_size=4)
        one_window = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        while not stream.epoch_done():
            stream.next_batch()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert stream.pos.window == 3  # windows 0-2 read, the 4th found the file's end
    assert peak < 1.5 * one_window, f"peak {peak / 2**20:.1f} MB, one window " \
        f"{one_window / 2**20:.1f} MB"
