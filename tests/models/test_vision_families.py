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
from loratune.adapters.registry import AdapterError
from loratune.adapters.vlm_targets import (model_parts, resolve_saved_shortcuts,
                                           resolve_target_shortcuts)
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
    assert set(got.image_inputs) == set(want.keys()) - {"input_ids", "attention_mask"}
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


@pytest.mark.parametrize("case", [0, 1])
def test_only_the_answers_are_labelled(family, case):
    name, folder = family
    model, tokenizer, image_processor = load_vision_model(folder)
    ex = encode_vision(*CASES[case], tokenizer, image_processor, vision_family(model.config))
    tags = set(tokenizer.convert_tokens_to_ids(IMAGE_TAGS[name]))
    assert tags <= set(ex.input_ids)  # the image is there ...
    taught = [t for t, label in zip(ex.input_ids, ex.labels) if label != IGNORE]
    assert not tags & set(taught)     # ... and never labelled
    want = ["red"] if case == 0 else ["red, blue", "red"]
    assert _answer_runs(tokenizer, ex) == want


def _answer_runs(tokenizer, ex):
    """The labelled spans decoded, each without the turn's end tokens."""
    ends = {tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(
        ["<end_of_turn>", "<|im_end|>", "<end_of_utterance>"])}
    runs, run = [], []
    for tok, label in [*zip(ex.input_ids, ex.labels), (None, IGNORE)]:
        if label != IGNORE and tok not in ends:
            run.append(tok)
        elif run:
            runs.append(tokenizer.decode(run).strip())
            run = []
    return runs


def test_train_save_reload_merge(family, tmp_path):
    name, folder = family
    model, tokenizer, _ = load_vision_model(folder)
    examples = _colour_examples(folder)[:2]
    setup_adapter(model, LoraConfig(target_modules="language", r=8, lora_alpha=16))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    language = FAMILIES[name].language + "."
    assert trainable and all(n.startswith(language) and "lora_" in n for n in trainable)
    losses = train_vision(model, examples, steps=8, lr=2e-2, batch=2)
    assert losses[-1] < 0.5 * losses[0], losses
    with torch.no_grad():
        trained = [vision_logits(model, ex) for ex in examples]
    save_adapter(model, tmp_path / "adapter")

    fresh, _, _ = load_vision_model(folder)
    load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        for ex, want in zip(examples, trained):
            torch.testing.assert_close(vision_logits(fresh, ex), want, rtol=0, atol=1e-5)
        merged = merge_and_unload(fresh)
    merged.save_pretrained(tmp_path / "merged")
    for extra in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                  "preprocessor_config.json"):
        shutil.copy(folder / extra, tmp_path / "merged" / extra)
    again, _, _ = load_vision_model(tmp_path / "merged")
    assert type(again).__name__ == CLASSES[name]
    assert not any("lora_" in k for k in again.state_dict())
    with torch.no_grad():
        for ex, want in zip(examples, trained):
            torch.testing.assert_close(vision_logits(again, ex), want, rtol=1e-4, atol=1e-4)


def test_qlora_language_model_in_nf4_vision_in_compute_dtype(family):
    name, folder = family
    model, _, _ = load_vision_model(folder)
    parts = FAMILIES[name]
    quantized = quantize_language_model(model, QuantConfig(compute_dtype="bfloat16"))
    four_bit = sorted(n for n, m in model.named_modules() if isinstance(m, Linear4bit))
    assert four_bit == sorted(quantized) and len(four_bit) == 2 * 7  # q k v o gate up down
    assert all(n.startswith(parts.language + ".") for n in four_bit)
    outside = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and n.startswith((parts.vision + ".", parts.projector + "."))]
    assert outside and all(m.weight.dtype == torch.bfloat16 for m in outside)
    setup_adapter(model, LoraConfig(target_modules="language", r=8, lora_alpha=16))
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    losses = train_vision(model, _colour_examples(folder)[:2], steps=2, lr=2e-2)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    moved = [n for n, p in model.named_parameters()
             if p.requires_grad and not torch.equal(p.detach(), lora[n])]
    assert moved and all(n.startswith(parts.language + ".") for n in moved)


def test_part_shortcuts_resolve(family):
    name, folder = family
    model, _, _ = load_vision_model(folder)
    parts = FAMILIES[name]
    assert model_parts(model) == {"language": parts.language, "vision": parts.vision,
                                  "projector": parts.projector}
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    sides = ("language", "vision") + (("projector",) if name != "gemma3" else ())
    found = {part: resolve_target_shortcuts(model, [part], linears) for part in sides}
    for part, names in found.items():
        assert names and all(n.startswith(model_parts(model)[part] + ".") for n in names), part
    assert not set(found["vision"]) & set(found.get("projector", []))
    assert len(found["language"]) == 2 * 7
    assert resolve_saved_shortcuts(model, ["projector"]) == [parts.projector]
    if name == "gemma3":  # its projector is a bare weight matrix and a norm, no nn.Linear
        with pytest.raises(AdapterError, match="'projector'.*no linear layer.*modules_to_save"):
            resolve_target_shortcuts(model, ["projector"], linears)
        setup_adapter(model, LoraConfig(target_modules="language", modules_to_save=["projector"]))
        whole = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
        assert any(n.endswith("mm_input_projection_weight") for n in whole), whole


def test_the_training_loss_sees_the_images(family):
    """`loratune train`'s loss (train/loss.py on collate_images' batch) equals the model's own
    loss with the images, and moves when the pixels do: the images reach the language model."""
    from loratune.data.packing import collate_images
    from loratune.models.vision import vision_loss
    from loratune.train.loss import causal_lm_loss

    _, folder = family
    model, tokenizer, _ = load_vision_model(folder)
    examples = _colour_examples(folder)[:3]
    batch = collate_images([[ex] for ex in examples], tokenizer.pad_token_id)
    with torch.no_grad():
        total, n = causal_lm_loss(model, batch)
        want = sum(vision_loss(model, ex) * sum(label != IGNORE for label in ex.labels[1:])
                   for ex in examples)
        torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-4)
        # Each colour its opposite (not zeros: Idefics3 drops all-zero images as padding).
        inverted = dict(batch, pixel_values=-batch["pixel_values"])
        assert abs(float(causal_lm_loss(model, inverted)[0] - total)) > 1e-3


def test_cli_trains_on_a_data_file_with_images(family, tmp_path):
    name, folder = family
    for colour, rgb in COLOURS.items():
        _image(rgb).save(tmp_path / f"{colour}.png")
    rows = [{"messages": [{"role": "user", "content": "<image>Colour?"},
                          {"role": "assistant", "content": colour}], "images": [f"{colour}.png"]}
            for colour in COLOURS]
    rows.append({"messages": [{"role": "user", "content": [
        {"type": "image", "image": "red.png"}, {"type": "image", "image": "blue.png"},
        {"type": "text", "text": "Colours?"}]}, {"role": "assistant", "content": "red blue"}]})
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "run"), "model": {"name": str(folder)},
        "adapter": {"r": 4, "lora_alpha": 8, "target_modules": ["language"]},
        "data": {"train": str(tmp_path / "d.jsonl")},
        "train": {"max_steps": 3, "batch_size": 3, "lr": 2e-2, "warmup_ratio": 0.0}}))
    assert main(["train", str(config)]) == 0
    from safetensors.torch import load_file
    adapter = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    trained = [k for k, v in adapter.items() if "lora_B" in k and float(v.abs().sum()) > 0]
    assert trained and all(FAMILIES[name].language in k for k in trained)


def test_an_unknown_vision_model_type_is_refused_listing_the_families(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "paligemma", "architectures": ["PaliGemmaForConditionalGeneration"],
        "vision_config": {}}))
    with pytest.raises(ValueError, match="paligemma") as refused:
        vision_model_type(tmp_path)
    for name in BUILDERS:
        assert name in str(refused.value)


def test_qwen2_5_vl_encoding_gives_its_3d_positions(tmp_path):
    """Qwen2_5_VLProcessor returns mm_token_type_ids; without them the model falls back to 1-D
    positions (the logits of the tiny model move by up to 9), so training saw other positions
    than serving, which computes the 3-D ones."""
    from vision_models import tiny_qwen2_5_vl

    folder = tiny_qwen2_5_vl(tmp_path / "qwen2_5_vl")
    model, tokenizer, image_processor = load_vision_model(folder)
    messages, images = CASES[1]
    got = encode_vision(messages, images, tokenizer, image_processor,
                        vision_family(model.config))
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    want = _reference("qwen2_5_vl", folder, text, images)
    assert got.input_ids == want["input_ids"][0].tolist()
    assert set(got.image_inputs) == set(want.keys()) - {"input_ids"}
    torch.testing.assert_close(got.image_inputs["mm_token_type_ids"], want["mm_token_type_ids"])


def test_vqa_prompts_cut_the_per_token_rows(family):
    """`eval --task vqa` cuts the training encoding where the answer starts; the per-token
    image rows are cut with the ids, so generate() takes them (Qwen3-VL needs them)."""
    from loratune.config import ModelConfig
    from loratune.eval.tasks.vqa import answer, prompt_example
    from loratune.models.load import load_model

    name, folder = family
    model, tokenizer = load_model(ModelConfig(name=str(folder)))
    ids, inputs = prompt_example(tokenizer, "q.jsonl:1", *CASES[0])
    key = FAMILIES[name].token_types
    assert not key or inputs[key].shape == (1, len(ids))
    assert isinstance(answer(model, tokenizer, ids, inputs, 2), str)
