"""`loratune eval`: one task on the base and on each adapter, with the same data.

The model is loaded once; every adapter is loaded beside the others under its own name and
made active in turn (the base runs with all of them disabled), so the columns of the report
differ by the adapter alone.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from loratune import progress
from loratune.data.templates import adapters_template
from loratune.eval.tasks import TaskData, TaskRecord, TaskResult, task_record


@dataclass
class Variant:
    label: str            # "base", or the adapter folder's name
    adapters: list[str]   # folders active in this column ([] for the base)
    result: TaskResult | None = None


@dataclass
class EvalRun:
    record: TaskRecord
    data: TaskData
    settings: dict
    variants: list[Variant]


def variants_of(cfg) -> list[Variant]:
    """The columns: the base (unless --no-base), then each adapter, or all stacked as one."""
    out = [Variant("base", [])] if cfg.base or not cfg.adapter else []
    if cfg.adapter and cfg.stack:
        out.append(Variant("+".join(Path(a).name for a in cfg.adapter), list(cfg.adapter)))
    elif cfg.adapter:
        names = [Path(a).name for a in cfg.adapter]
        for folder, name in zip(cfg.adapter, names):
            # two runs' "adapter" folders: the path tells them apart
            out.append(Variant(name if names.count(name) == 1 and name != "base" else folder,
                               [folder]))
    return out


def settings_of(cfg, record: TaskRecord) -> dict:
    """What the report records: the model, the adapters and the options the task reads."""
    return {"task": record.name, "model": cfg.model.model_dump(mode="json"),
            "adapter": list(cfg.adapter), "stack": cfg.stack,
            **{key: getattr(cfg, key) for key in record.options}}


def run_eval(cfg, model=None, tokenizer=None) -> EvalRun:
    """Read the task's data, then score every variant; `model`/`tokenizer` skip the loading."""
    from loratune.adapters import disable_adapters, load_adapter, set_active

    record = task_record(cfg.task)
    data = record.read(cfg)  # bad data fails here, before the model loads
    stored = adapters_template(cfg.adapter)  # the template the adapters were trained with
    if model is None:
        from loratune.models import load_model

        model, tokenizer = load_model(cfg.model)
    if stored is not None:
        tokenizer.chat_template, note = stored
        print(f"note: {note}", file=sys.stderr)
    names = {}
    for i, folder in enumerate(cfg.adapter):
        names[folder] = f"eval{i}"
        load_adapter(model, folder, names[folder], tokenizer=tokenizer)
    model.requires_grad_(False)
    variants = variants_of(cfg)
    for variant in variants:
        with progress.label(f"eval {variant.label}"):  # progress lines name the column
            if variant.adapters:
                set_active(model, [names[a] for a in variant.adapters])
                variant.result = record.score(model, tokenizer, data, cfg)
            else:
                with disable_adapters(model):
                    variant.result = record.score(model, tokenizer, data, cfg)
    return EvalRun(record, data, settings_of(cfg, record), variants)
