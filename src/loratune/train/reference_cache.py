"""Reference log-probs computed once (`train.preference.reference: cached`).

Before the first step every training example's reference log-probs (chosen and rejected; KTO:
completion and KL pair) are computed with the reference policy and written to the run folder as
`ref_logps.safetensors`, with a fingerprint of the tokens and the reference in its metadata. A
resumed run reads the file when the fingerprint matches and recomputes it otherwise. The steps
then skip the reference forward. Held-out batches keep the live reference.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from loratune.data.preference_pairs import PairExample, collate_preference
from loratune.files import write_atomic_file
from loratune.readers import CorruptFileError, open_safetensors
from loratune.train.preference_loss import Reference, completion_mask, row_sums

CACHE_FILE = "ref_logps.safetensors"


def fingerprint(examples: list, reference: str) -> str:
    """sha256 of what the cached numbers depend on: every example's tokens and the reference."""
    h = hashlib.sha256(reference.encode())
    for ex in examples:
        second = ex.rejected if isinstance(ex, PairExample) else ex.kl_completion
        first = ex.chosen if isinstance(ex, PairExample) else ex.completion
        h.update(json.dumps([ex.prompt, first, second]).encode())
    return h.hexdigest()


@torch.no_grad()
def compute_reference(model: nn.Module, reference: Reference, examples: list, pad_id: int,
                      batch_size: int, device: torch.device, chunk: int = 1024) -> torch.Tensor:
    """(N, 2) float64 reference log-probs of the examples, in their order."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(examples), batch_size):
        batch = collate_preference(examples[i:i + batch_size], pad_id)
        batch = {k: v.to(device) for k, v in batch.items() if k != "ref_logps"}
        with reference(model):
            sums = row_sums(model, batch, completion_mask(batch), chunk)
        out.append(sums.view(2, -1).T.double().cpu())
    model.train(was_training)
    return torch.cat(out)


def read_cache(path: Path, expected: str) -> torch.Tensor | None:
    """The cached tensor when the file exists and its fingerprint matches, else None."""
    if not path.is_file():
        return None
    try:
        with open_safetensors(path) as f:
            if (f.metadata() or {}).get("fingerprint") != expected:
                return None
            return f.get_tensor("ref_logps")
    except CorruptFileError:
        return None  # a damaged cache is recomputed, never trusted


def write_cache(path: Path, values: torch.Tensor, print_: str) -> None:
    write_atomic_file(path, lambda tmp: save_file({"ref_logps": values.contiguous()}, str(tmp),
                                                  metadata={"fingerprint": print_}),
                      overwrite=True)


def attach_reference(examples: list, values: torch.Tensor) -> None:
    for ex, (a, b) in zip(examples, values.tolist()):
        ex.ref = (a, b)


def cached_reference(model: nn.Module, reference: Reference, examples: list, pad_id: int,
                     batch_size: int, device: torch.device, out: Path, write: bool,
                     label: str, chunk: int = 1024) -> bool:
    """Give every example its reference log-probs, from the run folder's cache or computed
    (and then written when `write`). True when the cache was read."""
    path = out / CACHE_FILE
    expected = fingerprint(examples, label)
    values = read_cache(path, expected)
    found = values is not None and len(values) == len(examples)
    if not found:
        values = compute_reference(model, reference, examples, pad_id, batch_size, device, chunk)
        if write:
            write_cache(path, values, expected)
    attach_reference(examples, values)
    return found
