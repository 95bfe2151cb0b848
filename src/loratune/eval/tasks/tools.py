"""`tools`: held-out tool-use conversations (the files training reads, data/tools.py); every
assistant turn is generated from the turns before it, with the declared tools rendered by the
chat template, read back as calls by the template's parser (data/tool_calls.py, or
`--tool-parser`) and scored by eval/tool_metrics.py:
- name_acc, args_exact, ast_match: over the turns whose reference calls tools;
- no_call: over the turns whose reference answers in words (a model that calls anyway fails);
- accuracy (the headline): every turn, right by ast_match or no_call.
"""

from __future__ import annotations

import json

from loratune.config import DataConfig
from loratune.data.dataset import load_tool_conversations
from loratune.data.templates import resolve_template
from loratune.data.tool_calls import PARSERS, parse_tool_calls, parser_for_template
from loratune.eval.generate import generate_from_ids, prompt_ids
from loratune.eval.tasks.registry import (TaskData, TaskError, TaskRecord, TaskResult, Timer,
                                          hashed, register)
from loratune.eval.tool_metrics import (ast_match, calls_of, exact_match, names_match,
                                        schemas_of)

MAX_NEW_TOKENS = 256


class AnyName:
    """Every tool name: a call to an undeclared tool is still a call (a wrong one), not talk."""

    def __contains__(self, name) -> bool:
        return isinstance(name, str)


def read(cfg) -> TaskData:
    items = []
    for messages, tools in load_tool_conversations(cfg.data, DataConfig(train=cfg.data)):
        items += [(messages[:i], tools, m) for i, m in enumerate(messages)
                  if m["role"] == "assistant" and i > 0]
    return TaskData(items[: cfg.limit] if cfg.limit else items, hashed(cfg.data))


def tool_parser(tokenizer, cfg) -> str:
    """--tool-parser, else the one the chat template's call format needs."""
    parser = cfg.tool_parser or parser_for_template(resolve_template(tokenizer, None))
    if parser is None:
        raise TaskError("--task tools: the model's chat template shows no tool-call format; "
                        f"name one with --tool-parser ({', '.join(PARSERS)})")
    return parser


def score_turn(text: str, tools: list[dict], reference: dict, parser: str) -> dict:
    """One generated turn against its reference: the row of the report."""
    _, raw = parse_tool_calls(text, parser, AnyName())
    pred, ref = calls_of({"tool_calls": raw}), calls_of(reference)
    row = {"prediction": text, "calls": [[n, a] for n, a in pred],
           "reference": [[n, a] for n, a in ref] or reference["content"]}
    if ref:
        row.update(name=names_match(pred, ref), args_exact=exact_match(pred, ref),
                   ast=ast_match(pred, ref, schemas_of(tools)))
        row["correct"] = row["ast"]
    else:
        row["correct"] = row["no_call"] = not pred
    return row


def metrics_of(rows: list[dict]) -> tuple[dict[str, float], list[str]]:
    called = [r for r in rows if "ast" in r]
    silent = [r for r in rows if "no_call" in r]
    metrics = {"accuracy": sum(r["correct"] for r in rows) / len(rows)} if rows else {}
    for name, key, group in (("name_acc", "name", called), ("args_exact", "args_exact", called),
                             ("ast_match", "ast", called), ("no_call", "no_call", silent)):
        if group:
            metrics[name] = sum(r[key] for r in group) / len(group)
    notes = [] if called and silent else [
        "no turn " + ("calls a tool" if not called else "answers without a call") +
        ": the metrics over such turns are left out"]
    return metrics, notes


def score(model, tokenizer, data: TaskData, cfg) -> TaskResult:
    parser = tool_parser(tokenizer, cfg)
    prompts = [prompt_ids(tokenizer, msgs, None, tools) for msgs, tools, _ in data.items]
    with Timer() as timer:
        texts = generate_from_ids(model, tokenizer, prompts, cfg.max_new_tokens or
                                  MAX_NEW_TOKENS, cfg.batch_size)
    rows = [score_turn(t, tools, ref, parser) for t, (_, tools, ref) in zip(texts, data.items)]
    for row, (msgs, _, _) in zip(rows, data.items):
        row["prompt"] = msgs[-1]["content"] or json.dumps(msgs[-1].get("tool_calls"))
    metrics, notes = metrics_of(rows)
    return TaskResult(metrics, len(rows), timer.seconds, rows=rows, notes=notes)


register(TaskRecord(
    name="tools", summary="tool calls on held-out tool-use conversations: name, arguments, "
    "BFCL-style AST match, no call when none is needed",
    read=read, score=score, headline="accuracy",
    options=("limit", "max_new_tokens", "batch_size", "tool_parser"),
    formats={k: "{:.1%}" for k in ("accuracy", "name_acc", "args_exact", "ast_match",
                                   "no_call")}))
