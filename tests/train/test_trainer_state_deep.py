"""A trainer_state.json nested past the recursion limit is a damaged file named as such (resume
and the checkpoint scan say which), not a RecursionError from inside json."""

import pytest

from loratune.readers import CorruptFileError
from loratune.train.checkpoint import read_trainer_state


def test_a_deeply_nested_trainer_state_is_named_damaged(tmp_path):
    (tmp_path / "trainer_state.json").write_text('{"step": 3, "data_position": ' + "[" * 50_000)
    with pytest.raises(CorruptFileError, match=r"trainer_state.json: not valid JSON \(nested too "
                                               r"deeply\); the file is truncated or damaged"):
        read_trainer_state(tmp_path)
