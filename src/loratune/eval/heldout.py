"""Held-out evaluation: answer each prompt, compare with the reference by exact match."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from loratune.eval.generate import generate_chat
from loratune.eval.answer_match import exact_match


@dataclass
class EvalRow:
    prompt: str
    reference: str
    prediction: str
    correct: bool


@dataclass
class EvalReport:
    accuracy: float
    rows: list[EvalRow]

    @property
    def n(self) -> int:
        return len(self.rows)


def split_prompt_reference(conversation: list[dict]) -> tuple[list[dict], str]:
    if not conversation or conversation[-1]["role"] != "assistant":
        raise ValueError("a held-out conversation must end with the reference assistant answer")
    return conversation[:-1], conversation[-1]["content"]


def exact_match_eval(model: nn.Module, tokenizer, conversations: list[list[dict]],
                     max_new_tokens: int = 32, batch_size: int = 16,
                     template: str | None = None) -> EvalReport:
    prompts, refs = zip(*(split_prompt_reference(c) for c in conversations)) if conversations \
        else ((), ())
    preds = generate_chat(model, tokenizer, list(prompts), max_new_tokens, batch_size, template)
    rows = [EvalRow(p[-1]["content"], r, y, exact_match(y, r)) for p, r, y in
            zip(prompts, refs, preds)]
    acc = sum(r.correct for r in rows) / len(rows) if rows else 0.0
    return EvalReport(acc, rows)
