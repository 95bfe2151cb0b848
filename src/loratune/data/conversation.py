"""Fit a conversation to what its chat template can render, before rendering it.

- A system message the template refuses (Gemma 2: "System role not supported") or drops from
  a conversation that ends with an answer (Mistral v0.3 renders it only before the last user
  turn) is folded into the first user turn, "system\\n\\nuser", with a note: both training and
  inference see it in the same place. Templates that render it themselves (Llama 3, Qwen,
  Phi, Gemma 3, which folds it itself) are left alone.
- Think blocks (`<think>...</think>` in an answer, Qwen3's reasoning) are kept or stripped, by
  `data.think`.
"""

from __future__ import annotations

import re

THINK = ("keep", "strip")
FOLDED_NOTE = ("system message folded into the first user turn (the chat template has no "
               "system role, or drops it from a conversation ending with an answer)")
_THINK_BLOCK = re.compile(r"\s*<think>.*?</think>\s*", re.DOTALL)


def render(tokenizer, messages: list[dict], template: str | None,
           generation_prompt: bool, tools: list[dict] | None = None) -> str:
    """The template's text for `messages` (no tokenization); `tools`: the declared tools."""
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=generation_prompt,
                                         tools=template_tools(tools))


def template_tools(tools: list[dict] | None) -> list[dict] | None:
    """What a template's `tools` gets: None when no tool is declared. Llama 3.1 and Mistral v0.3
    test `tools is not none`, so an empty list would put their tool preamble into every prompt."""
    return tools or None


def strip_think(messages: list[dict]) -> list[dict]:
    """Answers without their `<think>...</think>` blocks (and without reasoning_content)."""
    out = []
    for m in messages:
        if m["role"] == "assistant":
            m = {k: v for k, v in m.items() if k != "reasoning_content"}
            if isinstance(m.get("content"), str):
                m["content"] = _THINK_BLOCK.sub("", m["content"], count=0).strip()
        out.append(m)
    return out


def fold_system(messages: list[dict]) -> list[dict]:
    """The leading system message joined to the first user turn ("system\\n\\nuser")."""
    system, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
    first = next((m for m in rest if m["role"] == "user"), None)
    if first is None:
        return rest
    first["content"] = f"{system}\n\n{first['content']}" if first["content"] else system
    return rest


def renders_system(tokenizer, template: str | None, messages: list[dict]) -> bool:
    """Whether the template keeps the leading system message in the conversation and in its
    prefix up to the first answer (False when it refuses or drops it)."""
    system = messages[0]["content"]
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    if first_user is None or not system:
        return True
    probes = [messages[:first_user + 1]]
    if first_user + 1 < len(messages) and messages[first_user + 1]["role"] == "assistant":
        probes.append(messages[:first_user + 2])
    for probe in probes:
        try:
            text = render(tokenizer, probe, template, probe[-1]["role"] == "user")
        except Exception:  # jinja's TemplateError from raise_exception, or what a template trips
            return False
        if system not in text:
            return False
    return True


def fit_conversation(messages: list[dict], tokenizer, template: str | None,
                     think: str = "keep") -> tuple[list[dict], list[str]]:
    """(messages as the template can render them, notes on what was changed)."""
    if think not in THINK:
        raise ValueError(f"think is '{think}'; expected one of {', '.join(THINK)}")
    notes = []
    if think == "strip":
        messages = strip_think(messages)
    if messages and messages[0]["role"] == "system" \
            and not renders_system(tokenizer, template, messages):
        messages = fold_system(messages)
        notes.append(FOLDED_NOTE)
    return messages, notes
