import json

import pytest

from loratune.demo import demo_heldout_path, demo_train_path
from loratune.eval.metrics import accuracy, exact_match


def _rows(path):
    return [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines()]


def test_heldout_is_disjoint_and_bilingual():
    train, held = _rows(demo_train_path()), _rows(demo_heldout_path())
    assert len(train) >= 1000 and len(held) >= 50
    assert not {r["input"] for r in train} & {r["input"] for r in held}
    assert not {r["output"] for r in train} & {r["output"] for r in held}
    langs = [r["lang"] for r in held]
    assert langs.count("en") == langs.count("zh")
    train_values = {v for r in train for v in r["output"].split("(")[1].rstrip(")").split(", ")}
    for r in held:  # categorical slot values were all seen in training
        for slot in r["output"].split("(")[1].rstrip(")").split(", "):
            if not slot.startswith(("minutes=", "time=")):
                assert slot in train_values, slot


def test_generator_is_deterministic(tmp_path):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).parents[1] / "scripts" / "make_demo_data.py"
    spec = importlib.util.spec_from_file_location("make_demo_data", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(tmp_path)
    assert (tmp_path / "train.jsonl").read_bytes() == demo_train_path().read_bytes()
    assert (tmp_path / "heldout.jsonl").read_bytes() == demo_heldout_path().read_bytes()


def test_exact_match():
    assert exact_match(" timer(minutes=5)<|im_end|>", "timer(minutes=5)")
    assert not exact_match("timer(minutes=50)", "timer(minutes=5)")
    assert accuracy(["a", "b"], ["a", "c"]) == 0.5


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
