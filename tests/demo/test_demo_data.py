"""The bundled demo data set, its generator, and the exact-match metrics."""

import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from loratune.demo import DEMO_DIR, demo_heldout_path, demo_train_path
from loratune.eval.answer_match import accuracy, exact_match, normalize_answer

SCRIPT = Path(__file__).parents[2] / "scripts" / "make_demo_data.py"
COMMAND = re.compile(r"^([a-z]+)\(([a-z_]+=[a-z0-9_:]+)(, [a-z_]+=[a-z0-9_:]+)*\)$")
NUMERIC_ONE_SLOT = "minutes"  # timer has one slot, so a held-out timer needs an unseen count


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _slots(output):
    return dict(s.split("=", 1) for s in output[output.index("(") + 1:-1].split(", "))


@pytest.fixture(scope="module")
def train():
    return _rows(demo_train_path())


@pytest.fixture(scope="module")
def held():
    return _rows(demo_heldout_path())


def _generator():
    spec = importlib.util.spec_from_file_location("make_demo_data", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_files_exist_and_parse(train, held):
    assert demo_train_path().parent == DEMO_DIR
    assert 1000 <= len(train) <= 1500 and 60 <= len(held) <= 100
    instructions = {r["instruction"] for r in train + held}
    assert len(instructions) == 1
    for r in train + held:
        assert set(r) == {"instruction", "input", "output", "lang"}
        assert r["lang"] in ("en", "zh") and r["input"].strip() == r["input"] and r["input"]
        assert COMMAND.match(r["output"]), r["output"]
        assert r["output"].isascii()
        assert len(r["input"]) <= 60 and len(r["output"]) <= 60
        has_cjk = any("\u4e00" <= ch <= "\u9fff" for ch in r["input"])
        assert has_cjk == (r["lang"] == "zh"), r


def test_mapping_is_deterministic(train, held):
    seen = {}
    for r in train + held:
        assert seen.setdefault(r["input"], r["output"]) == r["output"], r["input"]
    assert len({r["input"] for r in train}) == len(train)
    assert len({r["input"] for r in held}) == len(held)


def test_heldout_is_disjoint_from_training(train, held):
    assert not {r["input"] for r in train} & {r["input"] for r in held}
    assert not {r["output"] for r in train} & {r["output"] for r in held}


def test_languages_balanced(train, held):
    langs = Counter(r["lang"] for r in held)
    assert langs["en"] == langs["zh"] == len(held) // 2
    train_langs = Counter(r["lang"] for r in train)
    assert abs(train_langs["en"] - train_langs["zh"]) <= len(train) // 10
    # every intent is held out in both languages
    intents = {r["output"].split("(")[0] for r in train}
    for lang in ("en", "zh"):
        assert {r["output"].split("(")[0] for r in held if r["lang"] == lang} == intents


def test_heldout_slot_values_occur_in_training(train, held):
    train_values = Counter((k, v) for r in train for k, v in _slots(r["output"]).items())
    train_minutes = [int(v) for (k, v) in train_values if k == NUMERIC_ONE_SLOT]
    for r in held:
        for k, v in _slots(r["output"]).items():
            if k == NUMERIC_ONE_SLOT:  # a new count, but inside the trained range
                assert min(train_minutes) < int(v) < max(train_minutes)
            else:
                assert train_values[(k, v)] >= 2, (k, v)
    # every intent's slot names are the same in both sets
    names = lambda rows: {(r["output"].split("(")[0], tuple(_slots(r["output"]))) for r in rows}
    assert names(held) <= names(train)


def test_generator_is_deterministic(tmp_path):
    mod = _generator()
    mod.main(tmp_path / "a")
    mod.main(tmp_path / "b")
    for name in ("train.jsonl", "heldout.jsonl"):
        a = (tmp_path / "a" / name).read_bytes()
        assert a == (tmp_path / "b" / name).read_bytes()
        assert a == (DEMO_DIR / name).read_bytes(), f"{name} is stale: rerun the generator"


def test_exact_match():
    assert exact_match("timer(minutes=5)", "timer(minutes=5)")
    assert exact_match("  timer(minutes=5)\n", "timer(minutes=5)")
    assert exact_match(" timer(minutes=5)<|im_end|>", "timer(minutes=5)")
    assert exact_match("timer(minutes=5)<|im_end|>\n<|im_start|>user\nhi", "timer(minutes=5)")
    assert exact_match("timer(minutes=5)<|endoftext|><|endoftext|>", "timer(minutes=5)")
    assert not exact_match("timer(minutes=50)", "timer(minutes=5)")
    assert not exact_match("Timer(minutes=5)", "timer(minutes=5)")
    assert not exact_match("timer(minutes=5).", "timer(minutes=5)")
    assert not exact_match("The command is timer(minutes=5)", "timer(minutes=5)")
    assert not exact_match("", "timer(minutes=5)")
    assert normalize_answer(" a b <|im_end|> ") == "a b"


def test_accuracy():
    assert accuracy(["a", "b"], ["a", "c"]) == 0.5
    assert accuracy(["a<|im_end|>", " b "], ["a", "b"]) == 1.0
    assert accuracy([], []) == 0.0
    with pytest.raises(ValueError):
        accuracy(["a"], ["a", "b"])
