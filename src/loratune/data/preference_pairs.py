"""Preference data: chosen/rejected pairs and KTO's unpaired examples, tokenized and batched.

Accepted records (TRL's preference formats; strings are a user turn and an assistant answer,
rendered with the chat template as in SFT):

- explicit prompt: `prompt`, `chosen`, `rejected` — each a string or a message list
  (`prompt`: the turns before the answer; `chosen`/`rejected`: the answer, or a list ending with
  it); `messages` may stand for `prompt`;
- implicit prompt: `chosen` and `rejected` are whole conversations whose turns before the last
  are the prompt (they must be the same);
- unpaired (KTO): `prompt`, `completion`, `label` (true: desirable).

Only the final assistant turn is scored (its end-of-turn marker included), as answer-only SFT
labels it. A pair whose two prompts tokenize differently is an error naming the record.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loratune.config import DataConfig
from loratune.data.encode import IGNORE, answer_spans
from loratune.data.errors import DataError
from loratune.data.hf_datasets import iter_records
from loratune.data.templates import resolve_template

PAIR_KEYS = ("chosen", "rejected")
UNPAIRED_KEYS = ("completion", "label")
TRUE_LABELS = {"true", "1", "yes", "desirable"}
FALSE_LABELS = {"false", "0", "no", "undesirable"}


@dataclass
class PairExample:
    """One prompt with a chosen and a rejected completion, as token ids."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    ref: tuple[float, float] | None = None  # cached reference log-probs (chosen, rejected)


@dataclass
class UnpairedExample:
    """One prompt and completion labelled desirable or not (KTO). `kl_completion` is another
    example's completion, the mismatched pair KTO estimates its KL term with."""

    prompt: list[int]
    completion: list[int]
    desirable: bool
    kl_completion: list[int] = field(default_factory=list)
    ref: tuple[float, float] | None = None  # cached reference log-probs (completion, KL pair)


@dataclass
class PreferenceStats:
    """What `build_preference_examples` made of a file."""

    n_records: int = 0
    n_examples: int = 0
    n_truncated: int = 0  # cut to data.max_length (prompt first)
    n_dropped: int = 0  # longer than max_length with data.overflow: drop
    format: str = ""  # "pairs" or "unpaired"
    n_pairs: int = 0  # chosen/rejected pairs kept (KTO: each gave two examples)
    n_identical: int = 0  # of them, pairs whose chosen and rejected tokens are the same

    def dropped(self) -> str:
        why = " (longer than data.max_length, data.overflow: drop)" if self.n_dropped else ""
        return f"{self.n_dropped} dropped{why}"


# ------------------------------------------------------------------------- record -> messages


def _present(record: dict, key: str) -> bool:
    value = record.get(key)
    return value is not None and not (isinstance(value, float) and value != value)


def _side(value, key: str, where: str) -> list[dict]:
    """A completion as a message list ending with the assistant answer."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field '{key}' is empty (an empty completion)")
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        value = [value]
    messages = _message_list(value, key, where)
    if not messages or messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: field '{key}' must end with an assistant message")
    if not messages[-1]["content"].strip():
        raise DataError(f"{where}: field '{key}' has an empty assistant answer (an empty "
                        "completion)")
    return messages


def _message_list(value, key: str, where: str) -> list[dict]:
    if not isinstance(value, list):
        raise DataError(f"{where}: field '{key}' must be text or a list of messages, got "
                        f"{type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: {key}[{i}] must be {{role: system|user|assistant, "
                            f"content: text}}, got {m!r}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _prompt(record: dict, where: str) -> list[dict] | None:
    """The explicit prompt (`prompt` or `messages`), or None when the record has none."""
    key = "prompt" if _present(record, "prompt") else "messages" if _present(record, "messages") \
        else None
    if key is None:
        return None
    value = record[key]
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field '{key}' is empty")
        return [{"role": "user", "content": value}]
    messages = _message_list(value, key, where)
    if not messages:
        raise DataError(f"{where}: field '{key}' is an empty list")
    return messages


def pair_messages(record: dict, where: str) -> tuple[list[dict], list[dict]]:
    """(prompt + chosen, prompt + rejected) conversations of one pair record."""
    missing = [k for k in PAIR_KEYS if not _present(record, k)]
    if missing:
        raise DataError(f"{where}: missing field '{missing[0]}' (a preference pair needs "
                        "'chosen' and 'rejected')")
    prompt = _prompt(record, where)
    chosen = _side(record["chosen"], "chosen", where)
    rejected = _side(record["rejected"], "rejected", where)
    if prompt is None:  # implicit prompt: the turns before each answer
        if chosen[:-1] != rejected[:-1]:
            raise DataError(f"{where}: 'chosen' and 'rejected' have different prompts (the "
                            "turns before the last answer must be the same)")
        if len(chosen) < 2:
            raise DataError(f"{where}: no prompt: give 'prompt', or 'chosen'/'rejected' as "
                            "conversations with the turns before the answer")
        return chosen, rejected
    return prompt + chosen, prompt + rejected


def unpaired_messages(record: dict, where: str) -> tuple[list[dict], bool]:
    """(prompt + completion conversation, desirable) of one KTO record."""
    for key in ("prompt",) + UNPAIRED_KEYS:
        if not _present(record, key):
            raise DataError(f"{where}: missing field '{key}' (an unpaired example needs "
                            "'prompt', 'completion' and 'label')")
    prompt = _prompt(record, where)
    completion = _side(record["completion"], "completion", where)
    return prompt + completion, _label(record["label"], where)


def _label(value, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_LABELS | FALSE_LABELS:
        return value.strip().lower() in TRUE_LABELS
    raise DataError(f"{where}: field 'label' must be true or false, got {value!r}")


def record_kind(record: dict, where: str) -> str:
    """'pairs' or 'unpaired', from the keys of one record."""
    if _present(record, "chosen") or _present(record, "rejected"):
        return "pairs"
    if _present(record, "completion") or _present(record, "label"):
        return "unpaired"
    raise DataError(f"{where}: not a preference record (keys {sorted(record)}); expected "
                    "prompt/chosen/rejected pairs or prompt/completion/label")


# ---------------------------------------------------------------------------- tokenization


def split_answer(messages: list[dict], tokenizer, template: str,
                 where: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids): the conversation tokenized, cut where its last assistant turn
    starts; the answer runs through the end-of-turn marker."""
    try:
        text, spans = answer_spans(messages, tokenizer, template)
    except DataError as err:
        raise DataError(f"{where}: {err}") from None
    start, end = spans[-1]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    inside = [i for i, (a, b) in enumerate(offsets) if a < end and max(b, a + 1) > start]
    if not inside:
        raise DataError(f"{where}: the answer renders to no tokens (an empty completion)")
    first, last = inside[0], inside[-1]
    if first == 0:
        raise DataError(f"{where}: the prompt renders to no tokens")
    return ids[:first], ids[first:last + 1]


def fit_length(prompt: list[int], completions: list[list[int]],
               max_length: int) -> tuple[list[int], list[list[int]], bool]:
    """Cut to max_length tokens per sequence: the prompt first (its start; at least one token
    stays), then the completions' ends. Returns (prompt, completions, truncated)."""
    longest = max(len(c) for c in completions)
    over = len(prompt) + longest - max_length
    if over <= 0:
        return prompt, completions, False
    cut = min(over, len(prompt) - 1)
    prompt = prompt[cut:]
    room = max_length - len(prompt)
    return prompt, [c[:room] for c in completions], True


def build_preference_examples(path: str | Path, tokenizer, cfg: DataConfig,
                              kind: str) -> tuple[list, PreferenceStats]:
    """Tokenized pairs (kind 'pairs') or unpaired examples (kind 'unpaired') of a file.

    For 'unpaired' a file of pairs is accepted too: each pair gives a desirable and an
    undesirable example. Every example's KL completion is the previous example's (file order,
    cyclic), so reference log-probs can be computed once per example."""
    template = resolve_template(tokenizer, cfg.template)
    stats = PreferenceStats(format=kind)
    out = []
    for where, record in iter_records(str(path), cfg):
        stats.n_records += 1
        found = record_kind(record, where)
        if kind == "pairs" and found != "pairs":
            raise DataError(f"{where}: a pairwise objective needs prompt/chosen/rejected pairs; "
                            "this record is unpaired (prompt/completion/label: use "
                            "train.objective: kto)")
        examples = _encode_record(record, found, kind, tokenizer, template, cfg, where, stats)
        out.extend(examples)
    if kind == "unpaired":
        for i, ex in enumerate(out):
            ex.kl_completion = out[i - 1].completion
    stats.n_examples = len(out)
    if not out:
        raise DataError(f"{path}: no usable preference examples: all {stats.n_records} records "
                        f"were dropped ({stats.dropped()})")
    return out, stats


def encode_pair(chosen_conv: list[dict], rejected_conv: list[dict], tokenizer, template: str,
                where: str) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, chosen answer ids, rejected answer ids) of a pair's two conversations; the
    prompt must tokenize the same before both answers."""
    p1, chosen = split_answer(chosen_conv, tokenizer, template, where)
    p2, rejected = split_answer(rejected_conv, tokenizer, template, where)
    if p1 != p2:
        raise DataError(f"{where}: the prompt renders differently before 'chosen' and "
                        "before 'rejected' (the chat template or tokenizer treats them "
                        "differently); give the same prompt turns to both")
    return p1, chosen, rejected


def _encode_record(record: dict, found: str, kind: str, tokenizer, template: str,
                   cfg: DataConfig, where: str, stats: PreferenceStats) -> list:
    if found == "pairs":
        p1, chosen, rejected = encode_pair(*pair_messages(record, where), tokenizer, template,
                                           where)
        prompt, (chosen, rejected), cut = fit_length(p1, [chosen, rejected], cfg.max_length)
        if not _keep(cut, cfg, stats):
            return []
        stats.n_pairs += 1
        stats.n_identical += chosen == rejected  # after the cut: what the objective sees
        if kind == "pairs":
            return [PairExample(prompt, chosen, rejected)]
        return [UnpairedExample(prompt, chosen, True), UnpairedExample(prompt, rejected, False)]
    conv, desirable = unpaired_messages(record, where)
    prompt, completion = split_answer(conv, tokenizer, template, where)
    prompt, (completion,), cut = fit_length(prompt, [completion], cfg.max_length)
    if not _keep(cut, cfg, stats):
        return []
    return [UnpairedExample(prompt, completion, desirable)]


def _keep(truncated: bool, cfg: DataConfig, stats: PreferenceStats) -> bool:
    if truncated and cfg.overflow == "drop":
        stats.n_dropped += 1
        return False
    stats.n_truncated += truncated
    return True


# -------------------------------------------------------------------------------- batches


def _rows(seqs: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded rows of prompt + completion: input_ids, attention_mask, and labels that
    are the completion's tokens (IGNORE elsewhere)."""
    width = max(len(p) + len(c) for p, c in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, (prompt, completion) in enumerate(seqs):
        n = len(prompt) + len(completion)
        input_ids[r, :n] = torch.tensor(prompt + completion)
        labels[r, len(prompt):n] = torch.tensor(completion)
        attention_mask[r, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_pairs(pairs: list[PairExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows [chosen_1..chosen_B, rejected_1..rejected_B]; `ref_logps` (B, 2) when cached."""
    batch = _rows([(p.prompt, p.chosen) for p in pairs] +
                  [(p.prompt, p.rejected) for p in pairs], pad_id)
    if all(p.ref is not None for p in pairs):
        batch["ref_logps"] = torch.tensor([p.ref for p in pairs], dtype=torch.float64)
    return batch


def collate_unpaired(examples: list[UnpairedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows [completion_1..B, KL pair_1..B] and `desirable` (B,); `ref_logps` (B, 2) cached."""
    batch = _rows([(e.prompt, e.completion) for e in examples] +
                  [(e.prompt, e.kl_completion) for e in examples], pad_id)
    batch["desirable"] = torch.tensor([e.desirable for e in examples], dtype=torch.bool)
    if all(e.ref is not None for e in examples):
        batch["ref_logps"] = torch.tensor([e.ref for e in examples], dtype=torch.float64)
    return batch


def collate_preference(examples: list, pad_id: int) -> dict[str, torch.Tensor]:
    if isinstance(examples[0], PairExample):
        return collate_pairs(examples, pad_id)
    return collate_unpaired(examples, pad_id)


def preference_batches(examples: list, batch_size: int, pad_id: int, seed: int,
                       epoch: int) -> list[dict[str, torch.Tensor]]:
    """One epoch's micro-batches in training order: a pure function of (examples, seed, epoch)."""
    order = list(range(len(examples)))
    random.Random(f"loratune-pref:{seed}:{epoch}").shuffle(order)
    return [collate_preference([examples[i] for i in order[k:k + batch_size]], pad_id)
            for k in range(0, len(order), batch_size)]
