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

from loratune import progress
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
        if name not in known:
            continue
        if method_record(adapter_config(model, name).method).training.virtual_tokens:
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
    shown = progress.bar("scoring", len(rows), "rows")
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
        shown.update(len(chunk))
    shown.close()
    return out


@torch.no_grad()
def score_on_prefix(model: nn.Module, prefix: Prefill,
                    items: list[tuple[list[int], list[list[int]]]]) -> list[list[Scored]]:
    """Items whose contexts all begin with `prefix`, scored together: the prefix's cache
    repeated once per item, the rest of each context in one forward (padding between the
    prefix and a shorter rest, masked out, positions continuing the prefix), then every option
    of every item in one forward on those caches."""
    kw = cache_keyword(model.forward)
    device = prefix.last.device
    p = len(prefix.ids)
    rests = [ctx[p:] for ctx, _ in items]
    width = max(len(r) for r in rests)
    pad = rests[0][0]
    x = torch.tensor([[pad] * (width - len(r)) + r for r in rests], device=device)
    keep = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rests], device=device)
    mask = torch.cat([torch.ones((len(items), p), dtype=torch.long, device=device), keep], 1)
    positions = (p + (keep.cumsum(1) - 1).clamp(min=0))
    cache = copy.deepcopy(prefix.cache)
    cache.batch_repeat_interleave(len(items))
    out = model(input_ids=x, attention_mask=mask, position_ids=positions, use_cache=True,
                **{kw: cache})
    first = torch.log_softmax(out.logits[:, -1].float(), -1)
    rows = [(i, o) for i, (_, opts) in enumerate(items) for o in opts]
    if any(not o for _, o in rows):
        raise ValueError("an empty continuation has no likelihood")
    longest = max(len(o) for _, o in rows)
    if longest == 1:
        flat = [_continuation_scores(first[i][None], o) for i, o in rows]
    else:
        index = torch.tensor([i for i, _ in rows], device=device)
        cache = _cache_of(out)
        cache.batch_select_indices(index)
        y = torch.tensor([o + [o[-1]] * (longest - len(o)) for _, o in rows], device=device)
        mask = torch.cat([mask[index], torch.ones((len(rows), longest), dtype=torch.long,
                                                  device=device)], 1)
        start = torch.tensor([p + len(rests[i]) for i, _ in rows], device=device)
        positions = start[:, None] + torch.arange(longest, device=device)
        logits = model(input_ids=y, attention_mask=mask, position_ids=positions, use_cache=True,
                       **{kw: cache}).logits
        logprobs = torch.log_softmax(logits.float(), -1)
        flat = [_continuation_scores(torch.cat([first[i][None], row[:len(o) - 1]]), o)
                for row, (i, o) in zip(logprobs, rows)]
    out_items, at = [], 0
    for _, opts in items:
        out_items.append(flat[at:at + len(opts)])
        at += len(opts)
    return out_items


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
    if prefix and all(len(ctx) > len(prefix) and ctx[:len(prefix)] == prefix
                      for ctx, _ in items):
        # several items a forward on the shared prefix: batch_size options in all
        shared = prefill(model, prefix)
        per = max(1, batch_size // max(len(opts) for _, opts in items))
        runs = [lambda part=items[start:start + per]: score_on_prefix(model, shared, part)
                for start in range(0, len(items), per)]
    else:
        shared = prefill(model, prefix) if prefix else None
        runs = [lambda ctx=ctx, opts=opts: [score_options(model, prefill(model, ctx, shared),
                                                          opts, batch_size)]
                for ctx, opts in items]
    out = []
    with progress.bar("scoring", len(items), "questions") as shown:
        for run in runs:
            done = run()
            out += done
            shown.update(len(done))
    return out
