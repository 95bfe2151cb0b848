"""Fine-tune a vision-language model on image conversations, setup -> train (saving is
adapters.save_adapter, as for text models).

A recipe of its own because the text loop (train/) batches token rows only: it packs and pads
ids and labels, and its model call takes no pixel_values. Here one conversation is one step's
micro-batch (images give each a different token count), gradients accumulate over `batch`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from loratune.adapters import add_adapter, trainable_parameters
from loratune.config.methods import LoraConfig
from loratune.data.images import ImageRules, vision_messages
from loratune.models.vision import VisionExample, encode_vision, vision_family, vision_loss


def setup_adapter(model, config: LoraConfig | None = None) -> list[str]:
    """Inject LoRA; without target_modules set, on the language model's linear layers only."""
    family = vision_family(model.config)
    config = config or LoraConfig(target_modules=family.language_targets())
    return add_adapter(model, config)


def encode_records(records: list[tuple[int, dict]], source: str | Path, tokenizer,
                   image_processor, family, max_length: int = 2048,
                   rules: ImageRules = ImageRules()) -> list[VisionExample]:
    """Each (line, record) of a data file read with its images and encoded; dropped ones left
    out."""
    out = []
    for index, record in records:
        messages, images = vision_messages(record, source, index, rules)
        example = encode_vision(messages, images, tokenizer, image_processor, family, max_length)
        if example is not None:
            out.append(example)
    return out


def train_vision(model, examples: list[VisionExample], steps: int, lr: float = 1e-3,
                 batch: int = 1, seed: int = 0) -> list[float]:
    """`steps` AdamW steps over `examples` in order (cycling); returns each step's mean loss."""
    torch.manual_seed(seed)
    params = [p for _, p in trainable_parameters(model)]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(steps):
        total = 0.0
        for k in range(batch):
            loss = vision_loss(model, examples[(step * batch + k) % len(examples)]) / batch
            loss.backward()
            total += loss.item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
    model.eval()
    return losses

