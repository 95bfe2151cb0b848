"""Next-token loss computed only where labels exist, without materializing full-vocab logits.

Answer-only SFT labels a small share of tokens, so projecting every position through the
output layer (the largest matmul in a small model) and keeping fp32 logits for all of them
wastes time and memory. Here the decoder's hidden states are gathered at labelled positions
first, then projected in chunks whose logits are recomputed in backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from loratune.models.logprobs import supports_fast_path

IGNORE = -100


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def _body(model: nn.Module, inputs: dict) -> nn.Module:
    """The module whose hidden states feed the output layer. A vision-language model's
    get_decoder() is its text model alone, which would take pixel_values as an unused keyword
    and never see the images; with image inputs in the batch, the model under the head (its
    base_model) merges the image features into the text first."""
    text_only = set(inputs) <= {"input_ids", "attention_mask", "position_ids"}
    return model.get_decoder() if text_only else model.base_model


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor],
                   chunk: int = 1024) -> tuple[torch.Tensor, int]:
    """Return (sum of token losses, number of labelled tokens) for a batch with `labels`."""
    labels = batch["labels"]
    targets = labels[:, 1:]
    mask = targets != IGNORE
    n = int(mask.sum())
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if not supports_fast_path(model):
        logits = model(**inputs, use_cache=False).logits[:, :-1]
        return F.cross_entropy(logits[mask].float(), targets[mask], reduction="sum"), n
    hidden = _body(model, inputs)(**inputs, use_cache=False).last_hidden_state[:, :-1]
    hidden, targets = hidden[mask], targets[mask]
    head = model.get_output_embeddings()
    if n <= chunk:
        return _chunk_loss(head, hidden, targets), n
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, n, chunk):
        total = total + checkpoint(_chunk_loss, head, hidden[i:i + chunk], targets[i:i + chunk],
                                   use_reentrant=False)
    return total, n
