"""Gemma 3 (vision), SmolVLM and Qwen3-VL, each built from its transformers config class at a
tiny size: encoded as the family's transformers processor does, image tokens never labelled,
LoRA on the language model trained, saved, reloaded, merged into a folder transformers loads,
QLoRA (language model in NF4, vision tower in the compute dtype), the part shortcuts, and
`loratune train` on a data file with images."""

import json
import shutil

import pytest
import torch
import yaml
from PIL import Image
from vision_models import tiny_gemma3, tiny_qwen3_vl, tiny_smolvlm

from loratune.adapters import load_adapter, merge_and_unload, save_adapter
from loratune.adapters.vlm_targets import model_parts, resolve_target_shortcuts
from loratune.cli import main
from loratune.config import QuantConfig
from loratune.config.methods import LoraConfig
from loratune.data.encode import IGNORE
from loratune.models.vision import (FAMILIES, encode_vision, load_vision_model, vision_family,
                                    vision_logits, vision_model_type)
from loratune.models.vlm_quant import quantize_language_model
from loratune.quant.linear4bit import Linear4bit
from loratune.recipes.vision import setup_adapter, train_vision

BUILDERS = {"gemma3": tiny_gemma3, "smolvlm": tiny_smolvlm, "qwen3_vl": tiny_qwen3_vl}
CLASSES = {"gemma3": "Gemma3ForConditionalGeneration",
           "smolvlm": "SmolVLMForConditionalGeneration",
           "qwen3_vl": "Qwen3VLForConditionalGeneration"}
# The tokens an image becomes besides its placeholder run, none of which may be labelled.
IMAGE_TAGS = {"gemma3": ["<start_of_image>", "<image_soft_token>", "<end_of_image>"],
              "smolvlm": ["<image>", "<fake_token_around_image>", "<global-img>",
                          "<row_1_col_1>"],
              "qwen3_vl": ["<|image_pad|>", "<|vision_start|>", "<|vision_end|>"]}
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
           "yellow": (255, 255, 0)}


def _image(rgb, size=(64, 48)):
    return Image.new("RGB", size, rgb)


def _ask(question, answer, images=1):
    parts = [{"type": "image"}] * images + [{"type": "text", "text": question}]
    return [{"role": "user", "content": parts}, {"role": "assistant", "content": answer}]


# One image a turn, and two images then a text-only follow-up (multi-turn).
TWO_TURNS = _ask("Compare", "red, blue", images=2) + [
    {"role": "user", "content": "Which is first?"}, {"role": "assistant", "content": "red"}]
CASES = [(_ask("Colour?", "red"), [_image(COLOURS["red"])]),
         (TWO_TURNS, [_image(COLOURS["red"]), _image(COLOURS["blue"], (40, 40))])]


@pytest.fixture(scope="module", params=list(BUILDERS))
def family(request, tmp_path_factory):
    name = request.param
    return name, BUILDERS[name](tmp_path_factory.mktemp(name))


def _colour_examples(folder):
    """4 one-image examples, "Colour?" -> the plain colour's name."""
    model, tokenizer, images = load_vision_model(folder)
    family = vision_family(model.config)
    return [encode_vision(_ask("Colour?", name), [_image(rgb)], tokenizer, images, family)
            for name, rgb in COLOURS.items()]


@pytest.mark.parametrize("case", [0, 1])
def test_encoding_equals_the_family_processor(family, case):
    name, folder = family
    model, tokenizer, image_processor = load_vision_model(folder)
    messages, images = CASES[case]
    got = encode_vision(messages, images, tokenizer, image_processor,
                        vision_family(model.config))
    parts = [dict(m, content=[{"type": "text", "text": m["content"]}]
                  if isinstance(m["content"], str) else m["content"]) for m in messages]
    text = tokenizer.apply_chat_template(parts, tokenize=False)
    want = _reference(name, folder, text, images)
    want_ids = want["input_ids"][0].tolist()
    assert got.input_ids[:len(want_ids)] == want_ids
    # Training encodes end each answer with eos where the template does not (Gemma's
    # <end_of_turn>\n is followed by <eos>, as the text families are trained).
    assert got.input_ids[len(want_ids):] in ([], [tokenizer.eos_token_id])
    assert got.image_inputs.keys() <= set(want.keys())
    for key, value in got.image_inputs.items():
        if key.endswith("token_type_ids"):  # per token: the processor's ids (and the eos after)
            value = value[:, :len(want_ids)]
        torch.testing.assert_close(value, want[key], rtol=0, atol=0)
    logits = vision_logits(model, got)
    assert logits.shape[:2] == (1, len(got.input_ids))


def _reference(name, folder, text, images):
    """What transformers' processor for the family makes of the rendered text."""
    from transformers import AutoImageProcessor, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    image_processor = AutoImageProcessor.from_pretrained(folder)
    if name == "gemma3":
        from transformers import Gemma3Processor
        return Gemma3Processor(image_processor, tok, image_seq_length=4)(  # bos: the template's
            text=text, images=images, add_special_tokens=False, return_tensors="pt")
    if name == "smolvlm":  # SmolVLMProcessor writes Idefics3's image text; it needs a video
        from transformers import Idefics3Processor  # processor (torchvision) this one does not
        return Idefics3Processor(image_processor, tok, image_seq_len=4)(
            text=text, images=[images], return_tensors="pt")
    # Qwen3VLProcessor's image expansion: each <|image_pad|> repeated grid t*h*w / merge**2.
    inputs = image_processor(images=images, return_tensors="pt")
    merge = image_processor.merge_size ** 2
    for grid in inputs["image_grid_thw"]:
        text = text.replace("<|image_pad|>", "<|placeholder|>" * (int(grid.prod()) // merge), 1)
    ids = tok(text.replace("<|placeholder|>", "<|image_pad|>"), return_tensors="pt")["input_ids"]
    types = (ids == tok.convert_tokens_to_ids("<|image_pad|>")).long()
    return {"input_ids": ids, "mm_token_type_ids": types, **inputs}
