"""Batched chat generation with the tokenizer's chat template (left-padded prompts)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from loratune import progress
from loratune.data.conversation import fit_conversation, template_tools
from loratune.data.templates import resolve_template
from loratune.data.tools import fit_tools, template_name
from loratune.models.modules import eos_ids


class TemplateNote(UserWarning):
    """The conversation was changed to fit the chat template (e.g. a system message folded)."""



def prompt_ids(tokenizer, messages: list[dict], template: str | None = None,
               tools: list[dict] | None = None, template_text: str | None = None) -> list[int]:
    """The prompt's token ids, with the generation prompt; a system message the template
    cannot render is folded into the first user turn, as training does (with a warning).
    A tokenizer without a template gets the one training defaults to (resolve_template).
    `tools`: declared tools, rendered as training renders them (data/tools.py).
    `template_text`: a template's text, over `template` (a name): an adapter's stored one,
    which a server shares no tokenizer attribute for (serve/api.py)."""
    template = template_text or resolve_template(tokenizer, template)
    if tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
        messages, tools = fit_tools(messages, tools or [], template, template_name(tokenizer))
    messages, notes = fit_conversation(messages, tokenizer, template)
    for note in notes:
        warnings.warn(note, TemplateNote, stacklevel=2)
    out = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True,
                                        add_generation_prompt=True, return_dict=True,
                                        tools=template_tools(tools))
    return list(out["input_ids"])


def generate_chat(model: nn.Module, tokenizer, conversations: list[list[dict]],
                  max_new_tokens: int = 64, batch_size: int = 16, template: str | None = None,
                  do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                  seed: int | None = None) -> list[str]:
    """Answer each conversation (ending with a user turn); greedy unless do_sample."""
    return generate_from_ids(model, tokenizer, [prompt_ids(tokenizer, c, template)
                                                for c in conversations],
                             max_new_tokens, batch_size, do_sample, temperature, top_p, seed)


def generate_text(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 64,
                  batch_size: int = 16, do_sample: bool = False, temperature: float = 1.0,
                  top_p: float = 1.0, seed: int | None = None) -> list[str]:
    """Continue each plain-text prompt (no chat template: code completion, base models)."""
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    return generate_from_ids(model, tokenizer, ids, max_new_tokens, batch_size, do_sample,
                             temperature, top_p, seed, strip=False)


@torch.no_grad()
def generate_from_ids(model: nn.Module, tokenizer, prompts: list[list[int]],
                      max_new_tokens: int = 64, batch_size: int = 16, do_sample: bool = False,
                      temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                      strip: bool = True) -> list[str]:
    """The decoded continuation of each prompt (token ids), batched with left padding."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    if seed is not None:
        torch.manual_seed(seed)
    # the generation config's whole eos list: tokenizer.eos_token_id alone would override it
    stop = sorted(eos_ids(model, tokenizer)) or None
    answers: list[str] = []
    shown = progress.bar("generate", len(prompts), "prompts")
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(len(ids) for ids in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, ids in enumerate(chunk):
            input_ids[i, width - len(ids):] = torch.tensor(ids)
            attention[i, width - len(ids):] = 1
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample \
            else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                             max_new_tokens=max_new_tokens, pad_token_id=pad,
                             eos_token_id=stop, **sampling)
        for row in out[:, width:]:
            text = tokenizer.decode(row, skip_special_tokens=True)
            answers.append(text.strip() if strip else text)
        shown.update(len(chunk))
    shown.close()
    model.train(was_training)
    return answers
