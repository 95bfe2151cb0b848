"""Log-likelihood of continuations after a context, batched, reusing the context's KV cache.

A multiple-choice item is one context (the question, after a few-shot prefix shared by every
item of its subject) and a few continuations (the options). The context is run once; its
cache is repeated over the options, which run together in one forward, right-padded (causal
attention: padding after a token never changes it). A prefix shared by many contexts is run
once too (`prefill`) and copied for each. `score_rows` is the plain path (context and
continuation in one row, no cache): the reference the cached path is tested against, and the
path for models whose forward takes no cache or whose active adapters add virtual tokens.
Token ids are the caller's: a context and its continuation are tokenized separately.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from loratune.models.modules import cache_keyword


@dataclass
class Scored:
    logprob: float        # sum of the continuation's token log-probabilities
    greedy: bool          # every continuation token is the model's top choice
    tokens: int


@dataclass
class Prefill:
    """A context already run: its ids, KV cache and the logits after its last token."""

    ids: list[int]
    cache: object
    last: torch.Tensor


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _cache_of(out):
    return out.get("cache", None) if out.get("cache", None) is not None \
        else out.get("past_key_values", None)


def can_reuse_cache(model: nn.Module) -> bool:
    """False for a forward without a cache keyword, and under adapters that put virtual tokens
    before every row (prompt, prefix): those hook the cache themselves."""
    if cache_keyword(model.forward) is None:
        return False
    from loratune.adapters import active_adapters, adapter_config, adapter_names, method_record

    known = set(adapter_names(model))
    for name in active_adapters(model):
        if name in known and method_record(adapter_config(model, name).method).virtual_tokens:
            return False
    return True


def _continuation_scores(logprobs: torch.Tensor, ids: list[int]) -> Scored:
    """`logprobs[j]`: the distribution that predicts ids[j]."""
    picked = logprobs[torch.arange(len(ids)), torch.tensor(ids)]
    greedy = bool((logprobs.argmax(-1) == torch.tensor(ids)).all())
    return Scored(float(picked.sum()), greedy, len(ids))


@torch.no_grad()
def prefill(model: nn.Module, ids: list[int], start: Prefill | None = None) -> Prefill:
    """Run `ids` (which begin with `start.ids`, whose cache is copied, not changed)."""
    if not ids:
        raise ValueError("a context needs at least one token")
    kw = cache_keyword(model.forward)
    done = 0
    cache = None
    if start is not None:
        if ids[:len(start.ids)] != start.ids:
            raise ValueError("the context does not begin with the prefilled prefix")
        done, cache = len(start.ids), copy.deepcopy(start.cache)
        if done == len(ids):
            return Prefill(ids, cache, start.last)
    x = torch.tensor([ids[done:]], device=_device(model))
    mask = torch.ones((1, len(ids)), dtype=torch.long, device=x.device)
    out = model(input_ids=x, attention_mask=mask, use_cache=True, **{kw: cache})
    return Prefill(list(ids), _cache_of(out), out.logits[0, -1].float())


@torch.no_grad()
def score_options(model: nn.Module, context: Prefill, options: list[list[int]],
                  batch_size: int = 16) -> list[Scored]:
    """Each option's log-likelihood after the prefilled context, `batch_size` options a forward.
    The context's cache is used up (the last chunk runs on it rather than on a copy)."""
    if any(not o for o in options):
        raise ValueError("an empty continuation has no likelihood")
    kw = cache_keyword(model.forward)
    first = torch.log_softmax(context.last, -1)
    out: list[Scored] = []
    for start in range(0, len(options), batch_size):
        chunk = options[start:start + batch_size]
        width = max(len(o) for o in chunk)
        if width == 1:  # the context's last logits predict every one-token option
            out += [_continuation_scores(first[None], o) for o in chunk]
            continue
        last = start + batch_size >= len(options)
        cache = context.cache if last else copy.deepcopy(context.cache)
        cache.batch_repeat_interleave(len(chunk))
        x = torch.tensor([o + [o[-1]] * (width - len(o)) for o in chunk], device=first.device)
        mask = torch.ones((len(chunk), len(context.ids) + width), dtype=torch.long,
                          device=first.device)
        logits = model(input_ids=x, attention_mask=mask, use_cache=True, **{kw: cache}).logits
        logprobs = torch.log_softmax(logits.float(), -1)
        for row, o in zip(logprobs, chunk):
            out.append(_continuation_scores(torch.cat([first[None], row[:len(o) - 1]]), o))
    return out


@torch.no_grad()
def score_rows(model: nn.Module, rows: list[tuple[list[int], list[int]]],
               batch_size: int = 16) -> list[Scored]:
    """(context, continuation) pairs, each as one row context + continuation, no cache."""
    device = _device(model)
    out: list[Scored] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        for ctx, cont in chunk:
            if not ctx or not cont:
                raise ValueError("a row needs a context and a continuation of one token or more")
        width = max(len(c) + len(o) for c, o in chunk)
        x = torch.tensor([c + o + [o[-1]] * (width - len(c) - len(o)) for c, o in chunk],
                         device=device)
        logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits
        logprobs = torch.log_softmax(logits.float(), -1)
        for row, (ctx, cont) in zip(logprobs, chunk):
            out.append(_continuation_scores(row[len(ctx) - 1:len(ctx) + len(cont) - 1], cont))
    return out


def score_items(model: nn.Module, items: list[tuple[list[int], list[list[int]]]],
                batch_size: int = 16, prefix: list[int] | None = None,
                reuse_cache: bool | None = None) -> list[list[Scored]]:
    """(context, options) items: each option's score. Contexts that begin with `prefix` share
    its cache. `reuse_cache=None`: whenever the model allows (`can_reuse_cache`)."""
    if reuse_cache is None:
        reuse_cache = can_reuse_cache(model)
    if not reuse_cache:
        flat = score_rows(model, [(c, o) for c, opts in items for o in opts], batch_size)
        out, at = [], 0
        for _, opts in items:
            out.append(flat[at:at + len(opts)])
            at += len(opts)
        return out
    shared = prefill(model, prefix) if prefix else None
    return [score_options(model, prefill(model, ctx, shared), opts, batch_size)
            for ctx, opts in items]
