"""Mixtures (data/mixture.py): sources drawn by weight or epochs, seeded, shares recorded."""

import pytest

from loratune.config import DataConfig, DataSource
from loratune.data.mixture import merged_stats, mix, mixture_record
from loratune.data.dataset import DataStats


def _sources(**kw):
    return [DataSource(path=name, **rule) for name, rule in kw.items()]


def test_weights_are_sampling_probabilities():
    a, b = [f"a{i}" for i in range(300)], [f"b{i}" for i in range(100)]
    items, counts = mix([a, b], _sources(a={"weight": 1}, b={"weight": 3}), seed=0)
    assert len(items) == 400 and sum(counts) == 400   # as many draws as the sources hold
    assert counts[1] / 400 == pytest.approx(0.75, abs=0.05)   # b's weight 3/4, b is smaller
    assert sum(x.startswith("b") for x in items) == counts[1]
    # b is drawn ~300 times from 100 items: each item about three times, whole passes first
    assert {items.count(f"b{i}") for i in range(100)} <= {2, 3, 4}
    assert items[:20] != sorted(items[:20])   # interleaved as drawn, not source after source


def test_epochs_take_whole_passes_and_a_seeded_part():
    a, b = list(range(10)), list(range(100, 110))
    items, counts = mix([a, b], _sources(a={"epochs": 2}, b={"epochs": 0.5}), seed=3)
    assert counts == [20, 5]
    assert sorted(items[:20]) == sorted(a * 2)
    assert len(set(items[20:])) == 5 and set(items[20:]) <= set(b)
    again, _ = mix([a, b], _sources(a={"epochs": 2}, b={"epochs": 0.5}), seed=3)
    other, _ = mix([a, b], _sources(a={"epochs": 2}, b={"epochs": 0.5}), seed=4)
    assert again == items and other != items   # seeded: resume rebuilds the same mixture


def test_record_holds_realised_shares():
    sources = _sources(a={"weight": 2}, b={"weight": 2})
    per = [["xx"] * 50, ["yyyy"] * 50]
    record = mixture_record(sources, per, [60, 40], seed=7)
    assert record["seed"] == 7
    assert record["sources"]["a"] == {"path": "a", "weight": 0.5, "available": 50,
                                      "examples": 60, "share": 0.6, "token_share": 0.428571}


def test_merged_stats_add_counts():
    one = DataStats(n_records=3, n_dropped=1, format="alpaca", drop_reasons={"long": 1})
    two = DataStats(n_records=4, n_dropped=2, format="messages", drop_reasons={"long": 2})
    out = merged_stats([one, two])
    assert (out.n_records, out.n_dropped, out.drop_reasons) == (7, 3, {"long": 3})
    assert out.format == "mixed: alpaca, messages"


@pytest.mark.parametrize("train, eval_, match", [
    ([], None, "empty list"),
    ([{"path": "a", "weight": 1}, "b"], None, "weights on some sources only .b have none"),
    (["a", "a"], None, "sources named alike .a."),
    ([{"path": "a", "weight": 1, "epochs": 2}], None, "weight or epochs, not both"),
    ("a", [{"path": "b", "weight": 1}], "data.eval: weight/epochs apply to data.train only"),
])
def test_bad_mixtures_refused_by_name(train, eval_, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(train=train, eval=eval_)


def test_bare_paths_and_names():
    cfg = DataConfig(train=["a.jsonl", {"path": "a.jsonl", "name": "again", "epochs": 2}])
    assert [s.label for s in cfg.train] == ["a.jsonl", "again"]
