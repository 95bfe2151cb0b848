"""`loratune plan run.yaml`'s notes come from the method's record (TrainingSpec.plan_note)."""

import dataclasses

from loratune.adapters import registry
from loratune.adapters.registry import TrainingSpec
from loratune.config import build_config
from loratune.plan.from_run import run_notes


def notes(adapter: dict) -> list[str]:
    return run_notes(build_config({"model": {"name": "tiny"}, "adapter": adapter}, "test"))


def test_the_notes_say_what_the_record_says(monkeypatch):
    assert notes({"method": "lora", "r": 8}) == []
    assert notes({"method": "loha", "r": 8}) == [
        "loha (rank 8) is estimated as LoRA of the same total rank"]
    record = registry.method_record("lora")
    monkeypatch.setitem(registry._RECORDS, "lora", dataclasses.replace(
        record, training=TrainingSpec(plan_note="counted without its shadow")))
    assert notes({"method": "lora", "r": 8}) == ["lora (rank 8) is counted without its shadow"]
