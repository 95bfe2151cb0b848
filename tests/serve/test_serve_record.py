"""The adapter pool serves what a method's record says (ServingSpec), not what its name is."""

import dataclasses

import pytest

from loratune.adapters import add_adapter, save_adapter
from loratune.adapters import registry
from loratune.adapters.lora_product import scaled_factors
from loratune.adapters.registry import ServingSpec
from loratune.config import LoraConfig
from loratune.serve.pool import read_lora
from loratune.serve.types import BadAdapter
from tiny import randomize_lora, tiny_llama


def saved(tmp_path, **options):
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                  **options))
    randomize_lora(model)
    return save_adapter(model, tmp_path / "ad"), tiny_llama()


def with_serving(monkeypatch, method, spec):
    record = registry.method_record(method)
    monkeypatch.setitem(registry._RECORDS, method, dataclasses.replace(record, serving=spec))


def test_a_refused_method_is_refused_with_its_records_reason(tmp_path, monkeypatch):
    folder, base = saved(tmp_path, use_dora=True)
    assert read_lora("d", folder, base).scales     # served (tests/serve/test_serve_methods.py)
    with_serving(monkeypatch, "dora", ServingSpec(why_not="a reason of its own"))
    with pytest.raises(BadAdapter, match=r"is dora: a reason of its own\. Merge it "
                                         r"into the base with `loratune merge`"):
        read_lora("d", folder, base)


def test_the_pool_asks_the_record_both_ways(tmp_path, monkeypatch):
    folder, base = saved(tmp_path)
    assert len(read_lora("l", folder, base).layers) == 4
    with_serving(monkeypatch, "lora", ServingSpec(why_not="not today"))
    with pytest.raises(BadAdapter, match="is lora: not today"):
        read_lora("l", folder, base)
    dora, _ = saved(tmp_path / "d", use_dora=True)
    with_serving(monkeypatch, "dora", ServingSpec(factors=scaled_factors))
    assert len(read_lora("d", dora, base).layers) == 4   # served as its factors say
