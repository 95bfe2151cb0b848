"""`vqa`: questions about images, answered by a vision-language model, scored by exact match and
token F1 (`eval.text_metrics`).

The data is what training reads for such a model (data/images.py: image content parts, OpenAI
image_url parts, or LLaMA-Factory's `images` column with `<image>` markers); each
conversation's last assistant turn is the reference. The prompt is the conversation encoded as
training encodes it (the family's image encoder, models/vision.py), cut where the reference's
labels start: the images widen to the same tokens, and the reply starts after the same
assistant header. Greedy, one conversation per forward (images give each a different length).
"""

from __future__ import annotations

import torch

from loratune.config import DataConfig
from loratune.data.dataset import read_image_conversations
from loratune.eval.answer_match import exact_match
from loratune.eval.tasks.registry import (TaskData, TaskError, TaskRecord, TaskResult, Timer,
                                          hashed, register)
from loratune.eval.text_metrics import token_f1
from loratune.models.modules import eos_ids
from loratune.models.vision import last_answer_start, prompt_image_inputs

MAX_NEW_TOKENS = 32


def read(cfg) -> TaskData:
    items = read_image_conversations(cfg.data, DataConfig(train=cfg.data))[: cfg.limit]
    if not items:
        raise TaskError(f"--data {cfg.data}: no image conversations")
    return TaskData(items, hashed(cfg.data))


def reference_text(content) -> str:
    """The reference answer: a string, or the text of its text parts."""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if p.get("type") == "text")


def prompt_example(tokenizer, where: str, messages: list[dict], images: list):
    """(prompt ids, image inputs) of one conversation, its last turn left out."""
    encoder = getattr(tokenizer, "image_encoder", None)
    if encoder is None:
        raise TaskError("--task vqa needs a vision-language model (a folder whose config.json "
                        "has a vision_config); this model reads no images")
    example = encoder(tokenizer, messages, images, max_length=1 << 30)
    start = last_answer_start(messages, example.labels)
    if not start:
        raise TaskError(f"{where}: the reference answer has no tokens to score")
    return example.input_ids[:start], prompt_image_inputs(example, start)


@torch.no_grad()
def answer(model, tokenizer, ids: list[int], image_inputs: dict, max_new_tokens: int) -> str:
    """The greedy reply to one prompt with its images."""
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    extra = {k: v.to(device) for k, v in image_inputs.items()}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **extra,
                         max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                         top_p=None, top_k=None, pad_token_id=pad,
                         eos_token_id=sorted(eos_ids(model, tokenizer)) or None)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()


def score(model, tokenizer, data: TaskData, cfg) -> TaskResult:
    rows = []
    limit = cfg.max_new_tokens or MAX_NEW_TOKENS
    was_training = model.training
    model.eval()
    with Timer() as timer:
        for where, messages, images in data.items:
            ids, image_inputs = prompt_example(tokenizer, where, messages, images)
            prediction = answer(model, tokenizer, ids, image_inputs, limit)
            reference = reference_text(messages[-1]["content"])
            question = reference_text(messages[-2]["content"]) if len(messages) > 1 else ""
            rows.append({"where": where, "prompt": question,
                         "reference": reference, "prediction": prediction,
                         "exact_match": exact_match(prediction, reference),
                         "token_f1": round(token_f1(prediction, reference), 4)})
    model.train(was_training)
    n = len(rows)
    metrics = {"exact_match": sum(r["exact_match"] for r in rows) / n,
               "token_f1": sum(r["token_f1"] for r in rows) / n}
    return TaskResult(metrics, n, timer.seconds, rows=rows)


register(TaskRecord(
    name="vqa", summary="questions about images (vision-language models): exact match, token F1",
    read=read, score=score, headline="exact_match", options=("limit", "max_new_tokens"),
    formats={"exact_match": "{:.1%}", "token_f1": "{:.3f}"}))
