"""The demo job names the mixture it cannot plan for, before loading any model."""

import pytest

from loratune.demo import job


def test_demo_refuses_a_mixture_before_loading(tmp_path, monkeypatch):
    monkeypatch.setattr("loratune.models.load_model",
                        lambda *a, **k: pytest.fail("the model loaded before the refusal"))
    with pytest.raises(ValueError, match="a list of sources .a mixture. is for `loratune train`"):
        job.run_demo(str(tmp_path / "d"), ["data.train=[demo, {path: demo, name: again}]"])
