"""The joint prefill's inputs: new rows left-padded, each led by its adapter's virtual tokens.

A row's columns (KV-cache slots, and positions) are its adapter's virtual tokens, then its
prompt, then its completion. Prompt tuning's virtual embeddings go through the model in front
of the prompt (they are tokens of the input, as `inputs_embeds`); prefix tuning's keys and
values are written into the row's cache (its prompt starts at column n). Both the slot cache
and the dynamic cache build their prefill from this (slot_batch.py, dynamic_batch.py). Rows
with images get their image features and positions from image_rows.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from loratune.adapters.registry import RowLead
from loratune.serve.image_rows import ImageRows


def lead_tokens(lead: RowLead | None) -> int:
    return 0 if lead is None else lead.tokens


def row_columns(seq) -> int:
    """The columns a running row has used: its virtual tokens, prompt and completion so far
    (the next token's position is one less)."""
    return lead_tokens(seq.lead) + len(seq.request.prompt_ids) + len(seq.tokens)


@dataclass
class PrefillRows:
    ids: torch.Tensor                  # [rows, width] left-padded; 0 under virtual embeddings
    real: torch.Tensor                 # [rows, width] bool: the row's tokens, virtual ones too
    pos: torch.Tensor                  # [rows, width]: each token's position (= its column)
    embeds: torch.Tensor | None        # [rows, width, hidden] when a row has virtual embeddings
    prefixes: list[list[tuple[torch.Tensor, torch.Tensor]] | None]  # per row: per layer K, V
    lengths: list[int]                 # per row: columns used after the prefill
    positions: torch.Tensor | None = None  # the model's position ids when not `pos`: [3, rows,
    #                                        width] multimodal RoPE of rows with images
    extra: dict = field(default_factory=dict)  # other forward inputs (Gemma 3's token types)

    @property
    def position_ids(self) -> torch.Tensor:
        return self.pos if self.positions is None else self.positions

    @property
    def prefix_columns(self) -> int:
        """The longest prefix of these rows (0: none has one)."""
        return max((kv[0][0].shape[-2] for kv in self.prefixes if kv), default=0)


def prefill_rows(model: nn.Module, seqs: list, device: torch.device,
                 images: ImageRows | None = None) -> PrefillRows:
    """The inputs of one forward over the new rows `seqs` (each with `.lead` and a prompt);
    `images` puts the image features of rows that have them in place (image_rows.py)."""
    leads = [s.lead for s in seqs]
    virtual = [lead.tokens if lead is not None and lead.embeds is not None else 0
               for lead in leads]
    prompts = [s.request.prompt_ids for s in seqs]
    width = max(v + len(p) for v, p in zip(virtual, prompts))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    real = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, (v, p) in enumerate(zip(virtual, prompts)):
        ids[i, width - len(p):] = torch.tensor(p)
        real[i, width - len(p) - v:] = True
    ids, real = ids.to(device), real.to(device)
    prefixes = [lead.key_values if lead is not None else None for lead in leads]
    start = torch.tensor([kv[0][0].shape[-2] if kv else 0 for kv in prefixes], device=device)
    # Positions count the row's own tokens only, so a padded row sees what it would see alone;
    # they start after its prefix (as the prefix's own generate() shifts them).
    pos = (real.long().cumsum(1) - 1).clamp(min=0) + start[:, None]
    embeds, positions, extra = virtual_inputs(model, ids, leads, virtual, prompts), None, {}
    if images is not None:
        embeds, positions, extra = images.prefill_inputs(ids, embeds, pos, seqs)
    return PrefillRows(ids, real, pos, embeds, prefixes,
                       [lead_tokens(lead) + len(p) for lead, p in zip(leads, prompts)],
                       None if positions is pos else positions, extra)


def virtual_inputs(model: nn.Module, ids: torch.Tensor, leads: list, virtual: list[int],
                   prompts: list) -> torch.Tensor | None:
    """inputs_embeds with each row's virtual embeddings right before its prompt; None when no
    row has any (the forward then takes the ids)."""
    if not any(virtual):
        return None
    embeds = model.get_input_embeddings()(ids)
    width = ids.shape[1]
    for i, (lead, v, p) in enumerate(zip(leads, virtual, prompts)):
        if v:
            embeds[i, width - len(p) - v:width - len(p)] = lead.embeds.to(embeds.dtype)
    return embeds
