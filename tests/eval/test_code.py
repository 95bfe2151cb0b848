"""`code`: pass@k by hand, outcomes per problem, HumanEval files end to end."""

import json

import pytest

from loratune.config.commands import EvalCommandConfig
from loratune.data import DataError
from loratune.eval.run import run_eval
from loratune.eval.sandbox import Limits
from loratune.eval.tasks import code
from tiny import tiny_llama

ADD = {"task_id": "t/0", "prompt": "def add(a, b):\n    \"\"\"a + b\"\"\"\n",
       "test": "def check(f):\n    assert f(1, 2) == 3\n    assert f(-1, 1) == 0\n",
       "entry_point": "add"}
NEG = {"task_id": "t/1", "prompt": "def neg(x):\n", "entry_point": "neg",
       "test": "def check(f):\n    assert f(2) == -2\n"}


def test_pass_at_k_by_hand():
    assert code.pass_at_k(5, 1, 1) == pytest.approx(0.2)
    assert code.pass_at_k(5, 1, 2) == pytest.approx(1 - 6 / 10)   # 1 - C(4,2)/C(5,2)
    assert code.pass_at_k(5, 0, 3) == 0.0
    assert code.pass_at_k(5, 4, 2) == 1.0
    assert code.pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # 1 - C(7,5)/C(10,5)


def test_outcomes_are_reported_per_problem(tmp_path):
    """add: 1 of 5 passes (one wrong, one endless, one opens a socket, one writes outside);
    neg: 2 of 2. pass@1 = (0.2 + 1) / 2, pass@2 = (0.4 + 1) / 2."""
    outside = tmp_path / "x"
    completions = [
        ["    return a + b\n", "    return a - b\n", "    while True:\n        pass\n",
         "    import socket\n    socket.socket()\n    return a + b\n",
         f"    open({str(outside)!r}, 'w')\n    return a + b\n"],
        ["    return -x\n", "    return 0 - x\n"],
    ]
    result = code.score_completions([ADD, NEG], completions, [1, 2],
                                    Limits(timeout=3, cpu_seconds=1), workers=2)
    assert result.metrics == pytest.approx({"pass@1": 0.6, "pass@2": 0.7})
    assert [r["status"] for r in result.rows] == ["passed", "failed", "timeout", "refused",
                                                  "refused", "passed", "passed"]
    assert result.groups["t/0"] == {"pass@1": pytest.approx(0.2), "pass@2": pytest.approx(0.4),
                                    "n": 5, "passed": 1, "failed": 1,
                                    "timeout": 1, "refused": 2}
    assert result.rows[4]["detail"] == f"writing outside the folder: {outside}"
    assert not outside.exists()
    assert result.notes == ["outcomes: failed 1, passed 3, refused 2, timeout 1"]


@pytest.mark.parametrize("body", [
    "    import sys\n    sys.exit(0)\n",
    "    import os\n    os._exit(0)\n",
    "    raise SystemExit(0)\n",
    "    raise SystemExit\n",
])
def test_a_completion_that_exits_before_its_tests_ran_fails(body):
    """Exiting inside the function ends the program with status 0 before check() finished:
    the harness never printed its nonce, so it is a failure, not a pass."""
    result = code.score_completions([ADD], [[body]], [1], Limits(timeout=5))
    assert [(r["status"], r["detail"]) for r in result.rows] == [
        ("failed", "exited before its tests finished")]
    assert result.metrics == {"pass@1": 0.0}


def test_completion_is_cut_at_the_next_top_level_statement():
    assert code.truncate("    return 1\n\ndef other():\n    pass\n") == "    return 1\n"
    assert code.truncate("    x = 1\n    return x\nprint(add(1, 2))") == "    x = 1\n    return x"
    assert code.program(NEG, "    return -x") == (
        "def neg(x):\n    return -x\n\ndef check(f):\n    assert f(2) == -2\n\n\ncheck(neg)\n")


def test_code_task_end_to_end_with_a_model(tmp_path, smol_tokenizer, monkeypatch):
    """The tiny random model writes nonsense: every sample fails, each is run and reported.
    With the generator replaced by the right bodies, every problem passes."""
    data = tmp_path / "he.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in [ADD, NEG]))
    cfg = EvalCommandConfig(task="code", data=str(data), samples=2, k=[1, 2], temperature=0.8,
                            max_new_tokens=8, timeout=5)
    model = tiny_llama(vocab=len(smol_tokenizer))
    result = run_eval(cfg, model, smol_tokenizer).variants[0].result
    assert result.metrics == {"pass@1": 0.0, "pass@2": 0.0}
    assert len(result.rows) == 4 and all(r["status"] == "failed" for r in result.rows)
    right = {ADD["prompt"]: "    return a + b\n", NEG["prompt"]: "    return -x\n"}
    monkeypatch.setattr(code, "generate_text", lambda m, t, prompts, *a, **kw:
                        [right[p] + "\ndef extra():\n    raise SystemExit(1)\n" for p in prompts])
    result = run_eval(cfg, model, smol_tokenizer).variants[0].result
    assert result.metrics == {"pass@1": 1.0, "pass@2": 1.0}


def test_problems_missing_fields_are_named(tmp_path):
    data = tmp_path / "he.jsonl"
    data.write_text(json.dumps(ADD) + "\n" + json.dumps({**NEG, "test": ""}) + "\n")
    with pytest.raises(DataError, match=rf"{data}:2: missing or empty test \(HumanEval format"):
        code.read(EvalCommandConfig(task="code", data=str(data)))
    with pytest.raises(ValueError, match=r"k \(--k\): 3 is not within 1..samples \(2\)"):
        EvalCommandConfig(task="code", data="x", samples=2, k=[1, 3], temperature=0.5)
    with pytest.raises(ValueError, match=r"samples \(--samples\) > 1 needs temperature"):
        EvalCommandConfig(task="code", data="x", samples=2)


def test_without_bwrap_the_code_task_refuses_before_loading_a_model(tmp_path, monkeypatch,
                                                                    capsys):
    """`loratune eval --task code` with no bwrap on PATH: exit 2 and the install command, and
    no model is loaded; `--sandbox none` runs the completions anyway, with a warning."""
    from loratune.cli import main
    from loratune.eval.sandbox import UnsandboxedWarning

    data = tmp_path / "he.jsonl"
    data.write_text(json.dumps(ADD) + "\n")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["eval", "--task", "code", "--data", str(data),
                 "--model", str(tmp_path / "no-such-model")]) == 2
    err = capsys.readouterr().err
    assert "`bwrap` is not on PATH: install it (apt-get install bubblewrap)" in err
    assert "--sandbox none" in err and "no-such-model" not in err
    cfg = EvalCommandConfig(task="code", data=str(data), sandbox="none")
    with pytest.warns(UnsandboxedWarning, match="--sandbox none"):
        problems = code.read(cfg)
    result = code.score_completions(problems.items, [["    return a + b\n"]], [1],
                                    Limits(timeout=5), sandbox=cfg.sandbox)
    assert result.metrics == {"pass@1": 1.0}
