"""Evaluation tasks (see `registry` for how to add one). Importing the package registers the
built-in tasks, in the order `--task` lists them."""

from importlib import import_module

from loratune.eval.tasks.registry import (TaskData, TaskError, TaskRecord, TaskResult, hashed,
                                          register, task_names, task_record, unregister)

# the modules of the built-in tasks; each ends with its register(TaskRecord(...))
BUILTIN = ("exact", "mc", "perplexity", "generate", "code", "preference", "tools", "vqa")
for _name in BUILTIN:
    import_module(f"loratune.eval.tasks.{_name}")

__all__ = ["BUILTIN", "TaskData", "TaskError", "TaskRecord", "TaskResult", "hashed", "register",
           "task_names", "task_record", "unregister"]
