"""Log-probabilities of given next tokens under a causal LM, only where they are asked for.

Preference objectives score whole completions: the sum (or mean) of log p(token | before) over
the completion's tokens. As in the SFT loss (train/loss.py), the decoder's hidden states are
gathered at the scored positions first and only those go through the output layer, in chunks
whose logits are recomputed in backward.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _chunk_logps(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return logits.gather(-1, targets[:, None])[:, 0] - torch.logsumexp(logits, -1)


def supports_fast_path(model: nn.Module) -> bool:
    """Whether hidden states can be gathered before the output layer (also train/loss.py)."""
    cfg = getattr(model, "config", None)
    # Soft-capped or scaled logits need the model's own head code.
    special = any(getattr(cfg, k, None) for k in ("final_logit_softcapping", "logit_scale"))
    return hasattr(model, "get_decoder") and not special


def next_token_logps(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     score: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """(B, L-1) fp32 log p(input_ids[:, t+1] | input_ids[:, :t+1]) where `score` (B, L-1) is
    True, 0 elsewhere. Rows are right-padded; `attention_mask` marks real tokens."""
    targets = input_ids[:, 1:][score]
    if not supports_fast_path(model):
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       use_cache=False).logits[:, :-1]
        picked = _chunk_logps(nn.Identity(), logits[score], targets)
    else:
        hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                     use_cache=False).last_hidden_state[:, :-1][score]
        head = model.get_output_embeddings()
        n = len(targets)
        if n <= chunk:
            picked = _chunk_logps(head, hidden, targets)
        else:
            picked = torch.cat([checkpoint(_chunk_logps, head, hidden[i:i + chunk],
                                           targets[i:i + chunk], use_reentrant=False)
                                for i in range(0, n, chunk)])
    out = torch.zeros(score.shape, dtype=torch.float32, device=picked.device)
    return out.masked_scatter(score, picked)
