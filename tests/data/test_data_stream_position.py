"""A checkpoint's data position that cannot be this file's (trainer_state.json edited, or the
data file cut since the checkpoint) is refused by name, not resumed somewhere else silently."""

import json

import pytest

from loratune.config import DataConfig
from loratune.data import DataError
from loratune.data.batch_stream import BatchStream

ROWS = [{"instruction": f"Say {w}", "output": f"{w} " * (i + 1)}
        for i, w in enumerate(["apple", "river", "stone", "cloud", "green", "metal", "piano"])]


@pytest.fixture
def setup(tmp_path, smol_tokenizer):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cfg = DataConfig(train=str(path), max_length=64, shuffle_buffer=3)

    def stream():
        return BatchStream(str(path), smol_tokenizer, cfg, 2, True,
                           smol_tokenizer.pad_token_id, 7)
    return stream


def test_a_position_past_the_files_records_is_refused(setup):
    saved = setup().position()
    with pytest.raises(DataError, match=r"record 50\) is past the file, which holds fewer records"):
        setup().restore({**saved, "window": 17, "start": 50, "used": 0}, "ckpt/state.json")


def test_a_position_at_the_files_end_still_resumes(setup):
    """epoch_done() moves a stream to the end of the file (start = every record): legitimate."""
    stream = setup()
    while not stream.epoch_done():
        stream.next_batch()
    saved, expected = stream.position(), stream.next_batch()
    assert saved["start"] == len(ROWS) and saved["epoch"] == 0
    again = setup()
    again.restore(saved, "ckpt/state.json")
    assert again.next_batch()["input_ids"].equal(expected["input_ids"])


@pytest.mark.parametrize("field", ["epoch", "window", "start", "used"])
def test_a_boolean_field_is_not_an_integer(setup, field):
    saved = setup().position()
    with pytest.raises(DataError, match=f"field {field} is not a non-negative integer"):
        setup().restore({**saved, field: True}, "ckpt/state.json")


@pytest.mark.parametrize("window, start", [(1, 2), (0, 3), (5, 3)])
def test_a_window_that_does_not_start_at_its_record_is_refused(setup, window, start):
    """shuffle_buffer 3: window 1 starts at record 3; (1, 2) would read records 2-4 seeded as
    window 1: an order no run had."""
    saved = setup().position()
    with pytest.raises(DataError, match=rf"window {window} cannot start at record {start} "
                                        r"\(windows of data.shuffle_buffer=3 records\)"):
        setup().restore({**saved, "window": window, "start": start, "used": 0}, "ckpt")
