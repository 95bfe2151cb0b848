"""A batch of rollouts as the GRPO update reads it, and the log-probs of its completions.

Rows are prompt + completion: prompts left-padded, completions right-padded (TRL's layout),
positions counted over real tokens so a padded row sees what it saw when it was sampled.
Log-probs are taken at the sampling temperature (logits / T), as the policy that sampled.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import nn

from loratune.adapters import disable_adapters
from loratune.models.logprobs import supports_fast_path
from loratune.train.rl_loss import LossSpec, policy_loss


@dataclass
class RolloutBatch:
    prompt_ids: torch.Tensor        # (B, P) left-padded
    prompt_mask: torch.Tensor       # (B, P) 1 on real tokens
    completion_ids: torch.Tensor    # (B, C) right-padded
    completion_mask: torch.Tensor   # (B, C) 1 on completion tokens (EOS included)
    advantages: torch.Tensor        # (B,)
    old_logps: torch.Tensor | None = None   # (B, C) the sampling policy's, when mu > 1
    ref_logps: torch.Tensor | None = None   # (B, C) adapter off, when beta > 0

    def rows(self, index: slice | torch.Tensor) -> RolloutBatch:
        return replace(self, **{f.name: getattr(self, f.name)[index] for f in fields(self)
                                if getattr(self, f.name) is not None})

    def __len__(self) -> int:
        return self.prompt_ids.size(0)


def pad_rows(rows: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of token lists padded to the longest, on the left or the right."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        where = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, where] = torch.tensor(r, dtype=torch.long)
        mask[i, where] = 1
    return ids, mask


def completion_logps(model: nn.Module, batch: RolloutBatch, temperature: float) -> torch.Tensor:
    """(B, C) fp32 log π(completion token | everything before it) at `temperature`; 0 on
    padding."""
    ids = torch.cat([batch.prompt_ids, batch.completion_ids], 1)
    mask = torch.cat([batch.prompt_mask, batch.completion_mask], 1)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    width = batch.completion_ids.size(1)
    kw = dict(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
    if supports_fast_path(model):
        hidden = model.get_decoder()(**kw).last_hidden_state[:, -width - 1:-1]
        logits = model.get_output_embeddings()(hidden)
    else:
        logits = model(**kw).logits[:, -width - 1:-1]
    logits = logits.float() / temperature
    picked = logits.gather(-1, batch.completion_ids[..., None])[..., 0]
    return (picked - torch.logsumexp(logits, -1)) * batch.completion_mask


@torch.no_grad()
def reference_logps(model: nn.Module, batch: RolloutBatch, temperature: float) -> torch.Tensor:
    """The reference policy's log-probs: the same model with its adapters switched off."""
    with disable_adapters(model):
        return completion_logps(model, batch, temperature)


def micro_batch_loss(model: nn.Module, batch: RolloutBatch, spec: LossSpec, temperature: float,
                     accum: float, step_tokens: float) -> tuple[torch.Tensor, dict]:
    """The policy loss of one micro-batch (its share of the step) and its stats."""
    logps = completion_logps(model, batch, temperature)
    return policy_loss(logps, batch.old_logps, batch.ref_logps, batch.advantages,
                       batch.completion_mask, spec, accum, step_tokens)
