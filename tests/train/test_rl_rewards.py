"""Reward functions of train.objective grpo: TRL's signature, built-ins, user code, errors."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from loratune.config import RewardSpec
from loratune.train.rl_rewards import RewardError, load_rewards, score

PROMPTS = ["What is 2+3?", "What is 2+3?", "What is 10/4?"]
COMPLETIONS = ["The answer is 5.", "It is 6", "2.5"]
COLUMNS = {"answer": ["5", "5", "2.50"], "completion_ids": [[1], [2], [3]]}

# From TRL's GRPOTrainer documentation ("Using a custom reward function"), unchanged.
TRL_DOC_REWARD = '''
def reward_len(completions, **kwargs):
    return [-abs(20 - len(completion)) for completion in completions]
'''


def _score(specs, prompts=PROMPTS, completions=COMPLETIONS, columns=COLUMNS):
    return score(load_rewards([RewardSpec(**s) for s in specs]), prompts, completions, columns)


def test_builtins():
    out = _score([{"function": "exact_match"}, {"function": "numeric"},
                  {"function": "regex", "pattern": r"answer is \d+"},
                  {"function": "length", "target_length": 4}])
    assert out[:, 0].tolist() == [0.0, 0.0, 0.0]          # the text must equal the answer
    assert out[:, 1].tolist() == [1.0, 0.0, 1.0]          # last number, 2.5 == 2.50
    assert out[:, 2].tolist() == [1.0, 0.0, 0.0]
    assert out[:, 3].tolist() == pytest.approx([-12 / 4, -3 / 4, 0.0])


def test_numeric_tolerance_and_none():
    cols = {"answer": ["3.1416", None, "7"]}
    out = _score([{"function": "numeric", "tolerance": 1e-3}],
                 completions=["pi is 3.14159", "x", "1,007"], columns=cols)
    assert out[0, 0] == 1.0 and math.isnan(out[1, 0]) and out[2, 0] == 0.0


def test_trl_doc_reward_from_a_file_runs_unchanged(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(TRL_DOC_REWARD)
    rewards = load_rewards([RewardSpec(function=f"{path}:reward_len", weight=0.5)])
    assert rewards[0].name == "reward_len" and rewards[0].weight == 0.5
    out = score(rewards, PROMPTS, COMPLETIONS, COLUMNS)
    assert out[:, 0].tolist() == [-4.0, -13.0, -17.0]


def test_trl_builtin_by_module_with_conversational_completions():
    pytest.importorskip("trl")
    prompts = [[{"role": "user", "content": "think"}]] * 2
    completions = [[{"role": "assistant", "content": "<think>\nhm\n</think>\n42"}],
                   [{"role": "assistant", "content": "42"}]]
    out = _score([{"function": "trl.rewards:think_format_reward"},
                  {"function": "numeric", "column": "solution"}], prompts, completions,
                 {"solution": ["42", "41"]})
    assert out.tolist() == [[1.0, 1.0], [0.0, 0.0]]


def _bad_file(tmp_path, body: str) -> str:
    path = tmp_path / "bad.py"
    path.write_text(body)
    return f"{path}:bad"


@pytest.mark.parametrize("body,message", [
    ("def bad(prompts, completions, **kw):\n    raise KeyError('oops')\n",
     r"reward bad raised KeyError: 'oops' .*first sample: prompt 'What is 2\+3\?'"),
    ("def bad(prompts, completions, **kw):\n    return [1.0]\n",
     "reward bad returned 1 values for 3 completions"),
    ("def bad(prompts, completions, **kw):\n    return [1.0, float('nan'), 0.0]\n",
     r"reward bad returned nan for sample 1 \(prompt 'What is 2\+3\?', completion 'It is 6'\)"),
    ("def bad(prompts, completions, **kw):\n    return [1.0, 'yes', 0.0]\n",
     "reward bad returned 'yes' for sample 1"),
])
def test_a_failing_reward_names_itself_and_the_sample(tmp_path, body, message):
    with pytest.raises(RewardError, match=message):
        _score([{"function": _bad_file(tmp_path, body)}])


@pytest.mark.parametrize("function,message", [
    ("nowhere.py:f", "reward file nowhere.py: not found"),
    ("json:no_such", "json has no function 'no_such'"),
    ("no_such_module_x:f", "importing no_such_module_x failed: ModuleNotFoundError"),
    ("exact", "expected a built-in"),
])
def test_bad_references(function, message):
    with pytest.raises(RewardError, match=message):
        load_rewards([RewardSpec(function=function)])


def test_missing_column_and_bad_options():
    with pytest.raises(RewardError, match="no column 'gold'.*columns: answer"):
        _score([{"function": "exact_match", "column": "gold"}])
    with pytest.raises(RewardError, match="set pattern"):
        load_rewards([RewardSpec(function="regex")])
    with pytest.raises(RewardError, match="not a valid regular expression"):
        load_rewards([RewardSpec(function="regex", pattern="(")])


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="the code reward needs bubblewrap")
def test_code_reward_runs_tests_in_the_sandbox(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("intact")
    tests = "assert add(2, 3) == 5\n"
    completions = ["```python\ndef add(a, b):\n    return a + b\n```",
                   "def add(a, b):\n    return a - b",
                   f"def add(a, b):\n    open({str(victim)!r}, 'w').write('x')\n    return a + b"]
    out = _score([{"function": "code"}], PROMPTS, completions,
                 {"tests": [tests, tests, tests]})
    assert out[:, 0].tolist()[:2] == [1.0, 0.0]
    assert victim.read_text() == "intact"  # the host's files are out of reach
    assert torch.isfinite(out).all()
