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


def test_an_oft_run_is_planned_as_lora_of_as_many_trained_values():
    """OFT's r counts blocks (0 when oft_block_size is given): the planner asks the record for
    the LoRA rank that trains as many values (b(b−1)/2 per block of width b, d/b blocks)."""
    from loratune.config.commands import PlanConfig
    from loratune.plan.from_run import plan_for_run

    def planned(adapter: dict) -> int:
        run = build_config({"model": {"name": "tiny"}, "adapter": adapter}, "test")
        return plan_for_run(run, PlanConfig()).rank

    assert planned({"method": "oft"}) == 8  # oft_block_size 32, r 0: ⌈31/4⌉
    assert planned({"method": "oft", "oft_block_size": 16}) == 4
    assert planned({"method": "oft", "r": 4, "oft_block_size": 0}) == 8  # width taken as 32
    assert planned({"method": "oft", "block_share": True}) == 1
    assert planned({"method": "lora", "r": 12}) == 12
    assert "OFT's blocks of width b" in notes({"method": "oft"})[0]
