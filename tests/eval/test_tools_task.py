"""`eval --task tools`: each metric on scripted answers (a random model never writes a call),
then the task end to end through run_eval with a scripted generator and through the CLI."""

import json
from pathlib import Path
from typing import get_args

import pytest

from loratune.cli import main
from loratune.config.commands import EvalCommandConfig, ToolParser
from loratune.data.tool_calls import PARSERS
from loratune.eval.run import run_eval
from loratune.eval.tasks import TaskError
from loratune.eval.tasks import tools as task
from tiny import randomize_lora, tiny_llama

QWEN = (Path(__file__).parents[1] / "fixtures" / "templates" / "qwen2_5.jinja").read_text()
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "required": ["city"], "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"},
        "units": {"type": "string", "enum": ["c", "f"]}, "above": {"type": "number"},
        "alerts": {"type": "boolean"}}}}}
TOOLS = [WEATHER]


def ref(*calls):
    return {"role": "assistant", "content": "", "tool_calls": [
        {"id": f"call{i:05d}", "type": "function", "function": {"name": n, "arguments": a}}
        for i, (n, a) in enumerate(calls, 1)]}


def hermes(*calls):
    return "\n".join(f'<tool_call>\n{json.dumps({"name": n, "arguments": a})}\n</tool_call>'
                     for n, a in calls)


PARIS = {"city": "Paris", "days": 3}


@pytest.mark.parametrize("said, name, exact, ast", [
    (("get_weather", {"days": 3, "city": "Paris"}), True, True, True),      # key order
    (("get_weather", {"city": "paris", "days": 3}), True, False, True),     # BFCL strings
    (("get_weather", {"city": "Paris", "days": 3.0}), True, False, False),  # integer type
    (("get_weather", {"city": "Paris", "days": "3"}), True, False, False),
    (("get_weather", {"city": "Paris", "days": True}), True, False, False),  # bool no integer
    (("get_weather", {"days": 3}), True, False, False),                     # required missing
    (("get_weather", {"city": "Paris", "days": 3, "country": "FR"}), True, False, False),
    (("get_weather", {"city": "Paris"}), True, False, False),               # a value left out
    (("get_time", {"city": "Paris", "days": 3}), False, False, False),      # undeclared tool
])
def test_one_call_scored_by_name_exact_and_ast(said, name, exact, ast):
    row = task.score_turn(hermes(said), TOOLS, ref(("get_weather", PARIS)), "hermes")
    assert (row["name"], row["args_exact"], row["ast"]) == (name, exact, ast)
    assert row["correct"] == ast and "no_call" not in row


def test_ast_types_numbers_enums_and_parallel_calls():
    score = lambda said, *want: task.score_turn(hermes(*said), TOOLS, ref(*want), "hermes")
    above = {"city": "Oslo", "above": 20.0}
    int_for_number = score([("get_weather", {"city": "Oslo", "above": 20})], ("get_weather", above))
    assert int_for_number["ast"] and not int_for_number["args_exact"]
    upper = score([("get_weather", {"city": "Oslo", "units": "C"})],
                  ("get_weather", {"city": "Oslo", "units": "c"}))
    assert not upper["ast"]                                   # outside the declared enum
    rome = ("get_weather", {"city": "Rome", "days": 3})
    swapped = score([rome, ("get_weather", PARIS)], ("get_weather", PARIS), rome)
    assert swapped["name"] and swapped["args_exact"] and swapped["ast"]
    one = score([rome], ("get_weather", PARIS), rome)
    assert not (one["name"] or one["args_exact"] or one["ast"])
    twice = score([rome, rome], ("get_weather", PARIS), rome)
    assert twice["name"] and not twice["args_exact"] and not twice["ast"]
    # the schema rules even when the reference breaks it: required city, no country
    for args in ({"days": 3}, {"city": "Oslo", "country": "NO"}):
        bad_ref = score([("get_weather", args)], ("get_weather", args))
        assert bad_ref["args_exact"] and not bad_ref["ast"]


@pytest.mark.parametrize("text, right", [
    ("It is sunny in Paris.", True),
    (hermes(("get_weather", PARIS)), False),
    (hermes(("get_time", {})), False),      # a call to a tool not declared is still a call
])
def test_no_call_when_none_is_needed(text, right):
    row = task.score_turn(text, TOOLS, {"role": "assistant", "content": "Sunny."}, "hermes")
    assert row["no_call"] is right and row["correct"] is right and "ast" not in row


def conversations(path):
    """Two calling conversations (OpenAI parallel, ShareGPT single) and one where none is
    needed: 5 assistant turns, 2 of them calls."""
    paris, rome = {"city": "Paris", "days": 2}, {"city": "Rome", "days": 2}
    openai = {"tools": TOOLS, "messages": [
        {"role": "user", "content": "Weather in Paris and Rome for 2 days?"},
        ref(("get_weather", paris), ("get_weather", rome)),
        {"role": "tool", "tool_call_id": "call00001", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call00002", "content": "rainy"},
        {"role": "assistant", "content": "Paris is sunny, Rome rainy."}]}
    sharegpt = {"tools": json.dumps(TOOLS), "conversations": [
        {"from": "human", "value": "Oslo tomorrow?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather",
                                                        "arguments": {"city": "Oslo"}})},
        {"from": "observation", "value": "snow"},
        {"from": "gpt", "value": "Snow in Oslo."}]}
    chat = {"tools": TOOLS, "messages": [{"role": "user", "content": "Hi!"},
                                         {"role": "assistant", "content": "Hello."}]}
    path.write_text("".join(json.dumps(r) + "\n" for r in (openai, sharegpt, chat)))
    return path


ANSWERS = [hermes(("get_weather", {"city": "Rome", "days": 2}),     # parallel, swapped: right
                  ("get_weather", {"city": "Paris", "days": 2})),
           "Paris is sunny.",                                        # no call needed: right
           hermes(("get_weather", {"city": "Oslo", "days": 1})),     # name right, args wrong
           "Snow.",                                                  # right
           hermes(("get_weather", {"city": "Hi"}))]                  # a call where none: wrong


@pytest.fixture
def scripted(monkeypatch, smol_tokenizer):
    """The tokenizer with Qwen2.5's template; generation answers ANSWERS, prompts are kept."""
    monkeypatch.setattr(smol_tokenizer, "chat_template", QWEN)
    prompts = []

    def generate(model, tokenizer, ids, max_new_tokens, batch_size):
        prompts.extend(tokenizer.decode(p) for p in ids)
        return ANSWERS[:len(ids)]

    monkeypatch.setattr(task, "generate_from_ids", generate)
    return prompts


def test_tools_task_scores_every_assistant_turn(tmp_path, scripted, smol_tokenizer):
    cfg = EvalCommandConfig(task="tools", data=str(conversations(tmp_path / "t.jsonl")))
    result = run_eval(cfg, tiny_llama(vocab=len(smol_tokenizer)), smol_tokenizer)
    result = result.variants[0].result
    assert result.n == 5 and result.metrics == pytest.approx({
        "accuracy": 3 / 5, "name_acc": 1.0, "args_exact": 1 / 2, "ast_match": 1 / 2,
        "no_call": 2 / 3})
    # each prompt is the turns before the answer, with the tools the template renders
    assert all('"name": "get_weather"' in p and "<tools>" in p for p in scripted)
    assert scripted[0].endswith("<|im_start|>assistant\n") and "<tool_response>" not in scripted[0]
    assert "<tool_response>\nsunny\n</tool_response>" in scripted[1]
    assert result.rows[2]["calls"] == [["get_weather", {"city": "Oslo", "days": 1}]]
    assert result.rows[2]["reference"] == [["get_weather", {"city": "Oslo"}]]
    assert result.rows[1]["prompt"] == "rainy"


def test_tool_parser_flag_overrides_the_template(tmp_path, scripted, smol_tokenizer,
                                                 monkeypatch):
    llama = ['{"name": "get_weather", "parameters": {"city": "Oslo"}}']
    monkeypatch.setattr(task, "generate_from_ids", lambda *a: llama)
    data = conversations(tmp_path / "t.jsonl")
    lines = data.read_text().splitlines()
    data.write_text(lines[1] + "\n")
    scored = {}
    for parser in (None, "llama3_json"):
        cfg = EvalCommandConfig(task="tools", data=str(data), limit=1, tool_parser=parser)
        result = run_eval(cfg, tiny_llama(vocab=len(smol_tokenizer)), smol_tokenizer)
        scored[parser] = result.variants[0].result.metrics["accuracy"]
    assert scored == {None: 0.0, "llama3_json": 1.0}   # hermes (Qwen's) reads no call in it


def test_a_template_without_a_call_format_names_the_flag(tmp_path, smol_tokenizer):
    cfg = EvalCommandConfig(task="tools", data=str(conversations(tmp_path / "t.jsonl")))
    with pytest.raises(TaskError, match=r"--tool-parser \(hermes, llama3_json, mistral, phi4\)"):
        run_eval(cfg, tiny_llama(vocab=len(smol_tokenizer)), smol_tokenizer)


def test_tool_parser_choices_are_the_parsers():
    assert get_args(ToolParser) == PARSERS


def test_cli_scores_base_and_adapter_side_by_side(tmp_path, smol_tokenizer, monkeypatch):
    """A random model writes no call: accuracy is the share of turns needing none (3 of 5)."""
    from loratune.adapters import add_adapter, save_adapter
    from loratune.config import LoraConfig

    monkeypatch.setattr(smol_tokenizer, "chat_template", QWEN)
    folder, model = tmp_path / "model", tiny_llama(vocab=len(smol_tokenizer))
    model.save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"]))
    save_adapter(randomize_lora(model), tmp_path / "adapter")
    data, out = conversations(tmp_path / "t.jsonl"), tmp_path / "out"
    assert main(["eval", "--task", "tools", "--data", str(data), "--model", str(folder),
                 "--adapter", str(tmp_path / "adapter"), "--out", str(out),
                 "--max-new-tokens", "4"]) == 0
    report = json.loads((out / "eval-tools.json").read_text())
    assert [v["label"] for v in report["variants"]] == ["base", "adapter"]
    for variant in report["variants"]:
        assert variant["metrics"] == {"accuracy": 0.6, "name_acc": 0.0, "args_exact": 0.0,
                                      "ast_match": 0.0, "no_call": 1.0}
    assert "| accuracy | 60.0% | 60.0% |" in (out / "eval-tools.md").read_text()


def test_an_adapter_trained_with_a_template_is_scored_with_it(tmp_path, smol_tokenizer,
                                                              monkeypatch):
    """SmolLM2's own template has no tools; an adapter folder holding chat_template.jinja
    (data.template chatml_tools) has base and adapter prompted with it and read by the hermes
    parser chosen from it, with no flag."""
    from loratune.adapters import add_adapter, save_adapter
    from loratune.config import LoraConfig
    from loratune.data.templates import store_template

    monkeypatch.setattr(smol_tokenizer, "chat_template", smol_tokenizer.chat_template)
    prompts = []

    def generate(model, tokenizer, ids, max_new_tokens, batch_size):
        prompts.extend(tokenizer.decode(p) for p in ids)
        return ANSWERS[:len(ids)]

    monkeypatch.setattr(task, "generate_from_ids", generate)
    model = tiny_llama(vocab=len(smol_tokenizer))
    add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"]), "trained")
    store_template(save_adapter(model, tmp_path / "adapter", "trained"), "chatml_tools")
    model = tiny_llama(vocab=len(smol_tokenizer))
    cfg = EvalCommandConfig(task="tools", data=str(conversations(tmp_path / "t.jsonl")),
                            adapter=[str(tmp_path / "adapter")])
    run = run_eval(cfg, model, smol_tokenizer)
    assert [v.label for v in run.variants] == ["base", "adapter"]
    for variant in run.variants:
        assert variant.result.metrics["accuracy"] == pytest.approx(3 / 5)
    assert len(prompts) == 10 and all("<tools>" in p and "SmolLM" not in p for p in prompts)
    assert "<|im_start|>tool\n<tool_response>\nsunny\n</tool_response>" in prompts[1]
