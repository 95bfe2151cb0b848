"""Reward functions of train.objective grpo, called TRL's way so TRL's run unchanged:

    f(prompts, completions, **columns) -> list[float | None]

`prompts` and `completions` hold one entry per completion (a group's prompt repeated);
completions are strings, or [{"role": "assistant", "content": ...}] when the prompt is a list of
messages (TRL's conversational form). Every other data column comes as a keyword list, plus
`completion_ids`. None means "not applicable" to that completion.

`train.rl.rewards` names built-ins (exact_match, regex, numeric, code, length) or user
functions as `path/to/file.py:function` or `module:function`. A reward that raises, returns the
wrong count or a NaN/non-number stops the step with a RewardError naming the function and the
sample; the run's last checkpoint is untouched.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from loratune.config import RewardSpec
from loratune.user_code import load_function

RewardFn = Callable[..., list]
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?|-?\.\d+")
FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", re.S)


class RewardError(ValueError):
    """A reward function that failed, or returned what a reward cannot be."""


@dataclass
class Reward:
    name: str       # the metric key part: the built-in's or the function's name
    fn: RewardFn
    weight: float


def text_of(completion) -> str:
    """A completion's text, whether a string or TRL's list of messages."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion if isinstance(m, dict))


# ------------------------------------------------------------------------------ built-ins


def exact_match(column: str) -> RewardFn:
    def exact_match(prompts, completions, **columns):
        answers = _column(columns, column, "exact_match")
        return [None if a is None else float(text_of(c).strip() == str(a).strip())
                for c, a in zip(completions, answers)]
    return exact_match


def regex(pattern: str) -> RewardFn:
    compiled = re.compile(pattern, re.S)

    def regex(prompts, completions, **columns):
        return [float(compiled.search(text_of(c)) is not None) for c in completions]
    return regex


def last_number(text: str) -> float | None:
    """The last number written in `text` (thousands commas allowed), or None."""
    found = NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def numeric(column: str, tolerance: float) -> RewardFn:
    def numeric(prompts, completions, **columns):
        out = []
        for c, a in zip(completions, _column(columns, column, "numeric")):
            want, got = (None if a is None else last_number(str(a))), last_number(text_of(c))
            out.append(None if want is None else float(
                got is not None and math.isclose(got, want, rel_tol=tolerance, abs_tol=tolerance)))
        return out
    return numeric


def length(target: int) -> RewardFn:
    def length(prompts, completions, **columns):
        return [-max(0, len(text_of(c)) - target) / target for c in completions]
    return length


def code_of(text: str) -> str:
    """The first fenced Python block of a completion, else the whole text."""
    found = FENCE.search(text)
    return found.group(1) if found else text


def code(column: str, timeout: float) -> RewardFn:
    """1.0 when the completion's code followed by the row's tests runs to the end in the eval
    sandbox (bubblewrap + seccomp, eval/sandbox.py), else 0.0."""
    from loratune.eval.sandbox import Limits, require_sandbox, run_programs

    require_sandbox("bwrap")  # now, not at the first step: no bwrap, no run

    def code(prompts, completions, **columns):
        tests = _column(columns, column, "code")
        todo = [i for i, t in enumerate(tests) if t is not None]
        sources = [f"{code_of(text_of(completions[i]))}\n\n{tests[i]}\n" for i in todo]
        outcomes = run_programs(sources, Limits(timeout=timeout))
        out: list[float | None] = [None] * len(completions)
        for i, o in zip(todo, outcomes):
            out[i] = float(o.passed)
        return out
    return code


def _column(columns: dict, name: str, reward: str) -> list:
    if name not in columns:
        known = ", ".join(k for k in columns if k != "completion_ids") or "(none)"
        raise RewardError(f"reward {reward}: the data has no column {name!r} (columns: {known}); "
                          "set column: in its train.rl.rewards entry")
    return columns[name]


def builtin(spec: RewardSpec) -> RewardFn | None:
    name = spec.function
    if name == "exact_match":
        return exact_match(spec.column or "answer")
    if name == "numeric":
        return numeric(spec.column or "answer", spec.tolerance)
    if name == "code":
        return code(spec.column or "tests", spec.timeout)
    if name == "length":
        if spec.target_length is None:
            raise RewardError("reward length: set target_length (characters before the penalty)")
        return length(spec.target_length)
    if name == "regex":
        if not spec.pattern:
            raise RewardError("reward regex: set pattern (the regular expression to match)")
        try:
            return regex(spec.pattern)
        except re.error as err:
            raise RewardError(f"reward regex: pattern {spec.pattern!r} is not a valid regular "
                              f"expression ({err})") from None
    return None


# ---------------------------------------------------------------------------- user code


def user_function(ref: str) -> RewardFn:
    """`path/to/file.py:function` or `module:function`, imported and checked callable."""
    where, sep, attr = ref.rpartition(":")
    if not sep or not where or not attr:
        raise RewardError(f"reward {ref!r}: expected a built-in (exact_match, regex, numeric, "
                          "code, length), path/to/file.py:function or module:function")
    return load_function(ref, "reward", RewardError)


def load_rewards(specs: list[RewardSpec]) -> list[Reward]:
    out = []
    for spec in specs:
        fn = builtin(spec) or user_function(spec.function)
        name = spec.function if builtin_name(spec.function) else getattr(
            fn, "__name__", spec.function.rpartition(":")[2])
        out.append(Reward(name, fn, spec.weight))
    return out


def builtin_name(name: str) -> bool:
    return name in ("exact_match", "regex", "numeric", "code", "length")


# ------------------------------------------------------------------------------ scoring


def score(rewards: list[Reward], prompts: list, completions: list,
          columns: dict[str, list]) -> torch.Tensor:
    """(N, F) rewards of N completions by F functions; None -> NaN. Raises RewardError naming
    the function and the sample on an exception, a wrong count or a value that is not a finite
    number."""
    out = torch.full((len(completions), len(rewards)), float("nan"))
    for j, reward in enumerate(rewards):
        try:
            values = reward.fn(prompts=prompts, completions=completions, **columns)
        except RewardError:
            raise
        except Exception as err:
            raise RewardError(f"reward {reward.name} raised {type(err).__name__}: {err} "
                              f"(on the batch of {len(completions)}, first sample: "
                              f"{_sample(prompts, completions, 0)})") from err
        values = list(values) if values is not None else []
        if len(values) != len(completions):
            raise RewardError(f"reward {reward.name} returned {len(values)} values for "
                              f"{len(completions)} completions (one float or None each)")
        for i, v in enumerate(values):
            out[i, j] = _checked(reward.name, v, i, prompts, completions)
    return out


def _checked(name: str, value, i: int, prompts: list, completions: list) -> float:
    if value is None:
        return float("nan")
    ok = isinstance(value, (int, float))
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value, ok = float(value), True
    if not ok or not math.isfinite(value):
        raise RewardError(f"reward {name} returned {value!r} for sample {i} "
                          f"({_sample(prompts, completions, i)}); expected a finite number or "
                          "None")
    return float(value)


def _sample(prompts: list, completions: list, i: int) -> str:
    prompt = prompts[i] if isinstance(prompts[i], str) else text_of(prompts[i])
    return f"prompt {prompt[-80:]!r}, completion {text_of(completions[i])[:120]!r}"
