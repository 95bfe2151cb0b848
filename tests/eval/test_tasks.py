"""`loratune eval --task`: the registry, the base and each adapter side by side, the report."""

import hashlib
import json

import pytest
import torch

from loratune.adapters import add_adapter, save_adapter
from loratune.cli import main
from loratune.config.commands import EvalCommandConfig
from loratune.config import LoraConfig
from loratune.eval.report import markdown
from loratune.eval.run import run_eval
from loratune.eval.tasks import (TaskData, TaskError, TaskRecord, TaskResult, hashed, register,
                                 task_names, task_record, unregister)
from tiny import randomize_lora, tiny_llama, unigram_llama

APPLE = 11977  # " apple" in the SmolLM2 tokenizer


def first_logit(model, tokenizer, data, cfg) -> TaskResult:
    """A toy task: the model's logit of token 1 after the token ids in each item."""
    with torch.no_grad():
        values = [model(torch.tensor([ids])).logits[0, -1, 1].item() for ids in data.items]
    return TaskResult({"logit": sum(values) / len(values)}, len(values),
                      groups={"first": {"logit": values[0]}})


@pytest.fixture
def toy_task(tmp_path):
    data = tmp_path / "ids.json"
    data.write_text(json.dumps([[1, 2, 3], [4, 5]]))
    record = register(TaskRecord(
        name="toy", summary="a test task", headline="logit", options=("limit",),
        read=lambda cfg: TaskData(json.loads(open(cfg.data).read()), hashed(cfg.data)),
        score=first_logit))
    yield data
    unregister(record.name)


def lora_folder(path, vocab, seed):
    model = tiny_llama(vocab=vocab)
    add_adapter(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    return save_adapter(randomize_lora(model, seed=seed, scale=1.0), path)


def test_unknown_task_names_the_flag_and_the_tasks(tmp_path, capsys, tiny_folder):
    with pytest.raises(TaskError, match=r"--task 'nope': no such task; expected one of exact"):
        task_record("nope")
    assert main(["eval", "--model", str(tiny_folder), "--task", "nope", "--data", "x"]) == 2
    assert "--task 'nope'" in capsys.readouterr().err


def test_a_task_registered_outside_the_package_runs_per_adapter_side_by_side(
        tmp_path, toy_task, tiny_folder, smol_tokenizer):
    """One `register` call makes a task; the base and each adapter are scored separately."""
    vocab = len(smol_tokenizer)
    a = lora_folder(tmp_path / "one" / "adapter", vocab, seed=1)
    b = lora_folder(tmp_path / "two" / "adapter", vocab, seed=2)
    out = tmp_path / "report"
    assert "toy" in task_names()
    assert main(["eval", "--model", str(tiny_folder), "--task", "toy", "--data", str(toy_task),
                 "--adapter", str(a), "--adapter", str(b), "--out", str(out)]) == 0
    report = json.loads((out / "eval-toy.json").read_text())
    assert [v["label"] for v in report["variants"]] == ["base", str(a), str(b)]
    assert report["data"]["files"] == {
        str(toy_task): hashlib.sha256(toy_task.read_bytes()).hexdigest()}
    assert report["settings"]["adapter"] == [str(a), str(b)]
    # each column is its own model: compare with the adapter loaded alone
    from loratune.adapters import load_adapter
    from loratune.models import load_model

    for variant, folder in zip(report["variants"], [None, a, b]):
        model, tok = load_model(str(tiny_folder))
        if folder is not None:
            load_adapter(model, folder)
        alone = first_logit(model, tok, TaskData([[1, 2, 3], [4, 5]], {}), None).metrics
        assert variant["metrics"]["logit"] == pytest.approx(alone["logit"], abs=1e-5)
    logits = [v["metrics"]["logit"] for v in report["variants"]]
    assert len({round(x, 4) for x in logits}) == 3
    md = (out / "eval-toy.md").read_text()
    assert f"| metric | base | {a} | {b} |" in md and "| first |" in md
    assert hashlib.sha256(toy_task.read_bytes()).hexdigest() in md


def test_stack_scores_the_adapters_as_one_model(tmp_path, toy_task, tiny_folder, smol_tokenizer):
    vocab = len(smol_tokenizer)
    a = lora_folder(tmp_path / "a", vocab, seed=1)
    b = lora_folder(tmp_path / "b", vocab, seed=2)
    cfg = EvalCommandConfig(task="toy", data=str(toy_task), adapter=[str(a), str(b)],
                            stack=True, base=False, model={"name": str(tiny_folder)})
    run = run_eval(cfg)
    assert [v.label for v in run.variants] == ["a+b"]
    from loratune.adapters import load_adapter, set_active
    from loratune.models import load_model

    model, tok = load_model(str(tiny_folder))
    load_adapter(model, a, "x")
    load_adapter(model, b, "y")
    set_active(model, ["x", "y"])
    both = first_logit(model, tok, run.data, cfg).metrics["logit"]
    assert run.variants[0].result.metrics["logit"] == pytest.approx(both, abs=1e-5)


def test_exact_task_is_the_default_with_a_hand_checked_score(tmp_path, data_file,
                                                             smol_tokenizer):
    """The unigram model answers "apple apple apple" to everything: 1 of the 8 references."""
    model = unigram_llama({APPLE: 20.0}, len(smol_tokenizer))
    cfg = EvalCommandConfig(data=str(data_file), max_new_tokens=3)
    assert cfg.task == "exact"
    run = run_eval(cfg, model, smol_tokenizer)
    result = run.variants[0].result
    assert result.metrics == {"exact_match": 1 / 8} and result.n == 8
    assert [r["correct"] for r in result.rows] == [True] + [False] * 7
    assert result.items_per_second > 0
    assert "| exact_match | 12.5% |" in markdown(run)


def test_report_goes_to_the_run_folder_of_a_trained_adapter(tmp_path, tiny_folder, data_file,
                                                            smol_tokenizer, capsys):
    run = tmp_path / "run"
    adapter = lora_folder(run / "adapter", len(smol_tokenizer), seed=1)
    (run / "run_summary.json").write_text("{}")
    assert main(["eval", "--model", str(tiny_folder), "--data", str(data_file), "--adapter",
                 str(adapter), "--max-new-tokens", "2", "--limit", "2"]) == 0
    report = json.loads((run / "eval-exact.json").read_text())
    assert [v["n"] for v in report["variants"]] == [2, 2]
    assert report["settings"]["limit"] == 2 and report["settings"]["max_new_tokens"] == 2
    assert "| exact_match |" in capsys.readouterr().out


def test_code_task_from_the_command_line_writes_outcomes_per_problem(tmp_path, tiny_folder):
    import loratune.eval

    problems = __import__("pathlib").Path(loratune.eval.__file__).parent / "samples" / \
        "humaneval.jsonl"
    out = tmp_path / "out"
    assert main(["eval", "--model", str(tiny_folder), "--task", "code", "--data", str(problems),
                 "--limit", "2", "--samples", "2", "--k", "1,2", "--temperature", "0.7",
                 "--max-new-tokens", "4", "--timeout", "5", "--out", str(out)]) == 0
    report = json.loads((out / "eval-code.json").read_text())
    assert report["settings"]["k"] == [1, 2] and report["settings"]["samples"] == 2
    (base,) = report["variants"]
    assert set(base["groups"]) == {"sample/0", "sample/1"}
    assert [r["status"] for r in base["rows"]] == ["failed"] * 4  # 4 random tokens of code
    assert base["metrics"] == {"pass@1": 0.0, "pass@2": 0.0}
    assert "| sample/0 | 0.0% |" in (out / "eval-code.md").read_text()


def test_the_harness_without_lm_eval_names_the_extra():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "import sys; sys.modules['lm_eval'] = None; "
                           "import loratune.eval.harness"], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "pip install 'loratune[harness]'" in proc.stderr


def test_eval_scores_a_4bit_base_with_quantize(tmp_path, tiny_folder):
    """--quantize nf4 loads the base through the 4-bit path: its perplexity is the 4-bit
    model's, not the full-precision one's."""
    from loratune.config import ModelConfig
    from loratune.eval.tasks import perplexity
    from loratune.models import load_model

    text = tmp_path / "t.txt"
    text.write_text("one two three four five six seven eight nine ten " * 2)
    out = tmp_path / "out"
    assert main(["eval", "--model", str(tiny_folder), "--quantize", "nf4", "--task",
                 "perplexity", "--data", str(text), "--out", str(out)]) == 0
    report = json.loads((out / "eval-perplexity.json").read_text())
    assert report["settings"]["model"]["quantization"]["type"] == "nf4"
    got = report["variants"][0]["metrics"]["perplexity"]
    cfg = EvalCommandConfig(task="perplexity", data=str(text))
    data = perplexity.read(cfg)
    for quant, same in [({"type": "nf4"}, True), (None, False)]:
        model, tok = load_model(ModelConfig(name=str(tiny_folder), quantization=quant))
        want = perplexity.score(model, tok, data, cfg).metrics["perplexity"]
        assert (got == pytest.approx(want, rel=1e-5)) is same
