"""Rows with images in a joint prefill (vision-language models).

A request with images carries its family's pixel inputs (serve/image_prompt.py). Before its row
joins a prefill, the vision tower runs on them alone, with the row's adapter slot for the whole
tower: the tower's layers see patches or tiles, not batch rows, so a per-row slot gather cannot
apply there (RowSlots.set([slot]) makes every layer take the one-slot path). A failure or a
non-finite feature ends that request alone, before any cache row is written. The joint prefill
then puts each row's features in place of its image tokens (inputs_embeds), so rows with and
without images, each with its own adapter, run the language model in one forward; decode is text
only and never runs the tower again.

Multimodal RoPE (Qwen2-VL's kind; the model has `get_rope_index`): an image's tokens take 3-D
positions (time, height, width) and the text after it continues from the largest of them, not
from its column. A row's prefill positions are then its own [3, tokens], and every later token's
position is its column plus the row's `shift` (transformers' rope delta), which the batches add
at each decode step (SlotBatch.decode, DynamicBatch.decode).

Families whose images do not enter as prompt tokens with one embedding each (mllama's
cross-attention, Qwen3-VL's deepstack features added inside text layers) are refused by name
(`vision_refusal`); their text requests are served as a text model's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from loratune.serve.multi_lora import RowSlots
from loratune.serve.types import NonFiniteOutput, ServeError


@dataclass
class SeenImages:
    """What the vision tower made of one request's images, kept until its prefill."""

    features: torch.Tensor            # [image tokens, hidden]: in place of its image tokens
    positions: torch.Tensor | None    # [3, prompt tokens] multimodal RoPE positions, or None
    shift: int = 0                    # a later token's position minus its column
    token_types: torch.Tensor | None = None   # [prompt tokens]: 1 at image tokens (Gemma 3)


# Inputs with one value a token, not pixels: the tower does not take them.
PER_TOKEN = ("token_type_ids", "mm_token_type_ids")


def vision_refusal(model: nn.Module) -> str | None:
    """Why this server cannot serve `model`'s images (None when it can, or for a text model):
    images must enter as features in place of image tokens, in one embedding per token."""
    config = model.config
    if getattr(config, "vision_config", None) is None:
        return None
    kind = getattr(config, "model_type", type(model).__name__)
    if getattr(config, "image_token_id", None) is None or \
            not hasattr(getattr(model, "model", None), "get_image_features"):
        return (f"{kind} takes images through cross-attention layers, not as tokens of the "
                "prompt; its rows cannot share the batch's prefill")
    if getattr(config.vision_config, "deepstack_visual_indexes", None):
        return (f"{kind} adds vision features into early text layers (deepstack), which the "
                "joint prefill does not carry")
    return None


def is_vision_model(model: nn.Module) -> bool:
    """A vision-language model whose images this server serves (vision_refusal says why not)."""
    return getattr(model.config, "vision_config", None) is not None and \
        vision_refusal(model) is None


class ImageRows:
    """The vision side of serving one vision-language model."""

    def __init__(self, model: nn.Module, row_slots: RowSlots):
        self.model, self.row_slots = model, row_slots
        self.inner = model.model
        self.image_id = model.config.image_token_id
        self.mrope = hasattr(self.inner, "get_rope_index")

    def see(self, prompt_ids: list[int], image_inputs: dict, slot: int, adapted: bool,
            device: torch.device) -> SeenImages:
        """Run the vision tower on one request's images with adapter slot `slot`."""
        inputs = {k: v.to(device) for k, v in image_inputs.items()}
        for name, t in inputs.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ServeError(f"the images' {name} hold inf or NaN; expected finite pixels")
        self.row_slots.set([slot], device)
        out = self.inner.get_image_features(
            **{k: v for k, v in inputs.items() if k not in PER_TOKEN})
        features = torch.cat([f.reshape(-1, f.shape[-1]) for f in out.pooler_output])
        wanted = prompt_ids.count(self.image_id)
        if features.shape[0] != wanted:
            raise ServeError(f"the images gave {features.shape[0]} image features for the "
                             f"prompt's {wanted} image tokens; expected one per token")
        if not torch.isfinite(features).all():
            what = "its adapter's vision-side weights overflow" if adapted else "the base model"
            raise (NonFiniteOutput if adapted else RuntimeError)(
                f"the vision tower produced non-finite image features (inf or NaN): {what}; "
                "this request was ended, others are unaffected")
        # Gemma 3's image tokens see each other both ways at prefill: its forward builds that
        # mask from token_type_ids, so the row's go with it (a 2-D mask: the dynamic cache).
        types = inputs.get("token_type_ids")
        types = None if types is None else types[0]
        if not self.mrope:
            return SeenImages(features, None, 0, types)
        ids = torch.tensor([prompt_ids], device=device)
        grid = {k: v for k, v in inputs.items() if k.endswith("grid_thw")}
        positions, delta = self.inner.get_rope_index(
            ids, mm_token_type_ids=(ids == self.image_id).int(), **grid)
        return SeenImages(features, positions[:, 0], int(delta.flatten()[0]))

    def prefill_inputs(self, ids: torch.Tensor, embeds: torch.Tensor | None, pos: torch.Tensor,
                       seqs: list) -> tuple[torch.Tensor | None, torch.Tensor, dict]:
        """(inputs_embeds with each row's image features in place, position ids, other
        forward inputs) of a joint prefill whose rows are right-aligned in `ids` [rows,
        width]; unchanged when no row has images."""
        seen = [s.seen for s in seqs]
        if not any(seen):
            return embeds, pos, {}
        if embeds is None:
            embeds = self.model.get_input_embeddings()(ids)
        width = ids.shape[1]
        positions = pos[None].expand(3, *pos.shape).clone() if self.mrope else pos
        types = torch.zeros_like(ids) if any(s and s.token_types is not None for s in seen) \
            else None
        for i, (seq, images) in enumerate(zip(seqs, seen)):
            if images is None:
                continue
            start = width - len(seq.request.prompt_ids)
            mask = ids[i, start:] == self.image_id
            embeds[i, start:][mask] = images.features.to(embeds.dtype)
            if images.positions is not None:
                positions[:, i, start:] = images.positions
            if images.token_types is not None:
                types[i, start:] = images.token_types
        return embeds, positions, {} if types is None else {"token_type_ids": types}
