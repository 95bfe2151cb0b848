"""The main job, end to end (data checks live in test_demo_data.py)."""

import json

import pytest



@pytest.mark.slow
def test_demo_job_runs_end_to_end(tmp_path, capsys):
    """The main job's code path on the real model, shortened to two steps and four items."""
    from loratune.demo.job import run_demo

    report = run_demo(str(tmp_path / "demo"), ["train.max_steps=2", "eval.limit=4",
                                                "train.eval_every=null"])
    out = capsys.readouterr().out
    assert "held-out exact match" in out and "before" in out and "after" in out
    assert report["exact_match_before"] == 0.0 and report["steps"] == 2
    assert (tmp_path / "demo" / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "demo" / "demo_report.json").read_text())["steps"] == 2
