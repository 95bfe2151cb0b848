"""Idefics3 / SmolVLM: encoded as transformers' Idefics3Processor does (token for token, same
pixel tensors), image tokens never labelled, trained through the recipe and `loratune train`,
the adapter reloading with equal logits."""

import json

import pytest
import torch
import yaml
from PIL import Image
from vision_models import tiny_idefics3

from loratune.adapters import load_adapter, save_adapter
from loratune.cli import main
from loratune.data.encode import IGNORE
from loratune.models.vision import encode_vision, load_vision_model, vision_family, vision_logits
from loratune.recipes.vision import setup_adapter, train_vision

RED, BLUE = Image.new("RGB", (56, 40), (255, 0, 0)), Image.new("RGB", (24, 24), (0, 0, 255))
ONE = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
       {"role": "assistant", "content": "red"}]
TWO = [{"role": "system", "content": "Be brief."},
       {"role": "user", "content": [{"type": "text", "text": "Compare"},
                                    {"type": "image"}, {"type": "image"}]},
       {"role": "assistant", "content": "red, blue"},
       {"role": "user", "content": "Which is first?"},
       {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]
CASES = [(ONE, [RED]), (TWO, [RED, BLUE])]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_idefics3(tmp_path_factory.mktemp("idefics3"))


@pytest.fixture(scope="module")
def loaded(folder):
    model, tokenizer, images = load_vision_model(folder)
    return model, tokenizer, images, vision_family(model.config)


def _encode(loaded, messages, images):
    _, tokenizer, processor, family = loaded
    return encode_vision(messages, images, tokenizer, processor, family)


def _parts(messages):
    return [dict(m, content=[{"type": "text", "text": m["content"]}]
                 if isinstance(m["content"], str) else m["content"]) for m in messages]


@pytest.mark.parametrize("case", [0, 1])
def test_encoding_equals_the_idefics3_processor(loaded, case):
    from transformers import Idefics3Processor

    model, tokenizer, image_processor, _ = loaded
    messages, images = CASES[case]
    processor = Idefics3Processor(image_processor, tokenizer, image_seq_len=4)
    text = tokenizer.apply_chat_template(_parts(messages), tokenize=False)
    want = processor(text=text, images=[images], return_tensors="pt")
    got = _encode(loaded, messages, images)
    assert got.input_ids == want["input_ids"][0].tolist()
    assert got.input_ids.count(model.config.image_token_id) > 4 * len(images)  # tiles split
    for key in ("pixel_values", "pixel_attention_mask"):
        torch.testing.assert_close(got.image_inputs[key], want[key], rtol=0, atol=0)


@pytest.mark.parametrize("case", [0, 1])
def test_only_the_answers_are_labelled(loaded, case):
    _, tokenizer, _, _ = loaded
    ex = _encode(loaded, *CASES[case])
    image_tags = set(tokenizer.convert_tokens_to_ids(
        ["<image>", "<fake_token_around_image>", "<global-img>", "<row_1_col_1>"]))
    taught = [t for t, label in zip(ex.input_ids, ex.labels) if label != IGNORE]
    assert not image_tags & set(taught)
    want = ["red<end_of_utterance>"] if case == 0 else [
        "red, blue<end_of_utterance>", "red<end_of_utterance>"]
    runs, run = [], []
    for tok, label in zip(ex.input_ids, ex.labels):
        if label != IGNORE:
            run.append(tok)
        elif run:
            runs.append(tokenizer.decode(run).strip()), run.clear()
    runs += [tokenizer.decode(run).strip()] if run else []
    assert runs == want


def test_trains_saves_and_reloads_equal_logits(folder, tmp_path):
    model, tokenizer, images = load_vision_model(folder)
    family = vision_family(model.config)
    model.requires_grad_(False)
    setup_adapter(model)
    examples = [encode_vision(m, i, tokenizer, images, family) for m, i in CASES]
    losses = train_vision(model, examples, steps=8, lr=2e-2)
    assert sum(losses[-2:]) < 0.7 * sum(losses[:2])
    save_adapter(model, tmp_path / "adapter")
    model.eval()
    fresh, _, _ = load_vision_model(folder)
    load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        for ex in examples:
            torch.testing.assert_close(vision_logits(fresh, ex), vision_logits(model, ex),
                                       rtol=0, atol=1e-5)


def test_cli_trains_on_images(folder, tmp_path):
    RED.save(tmp_path / "red.png"), BLUE.save(tmp_path / "blue.png")
    rows = [{"messages": [{"role": "user", "content": "<image>Colour?"},
                          {"role": "assistant", "content": "red"}], "images": ["red.png"]},
            {"messages": [{"role": "user", "content": [
                {"type": "image", "image": "red.png"}, {"type": "image", "image": "blue.png"},
                {"type": "text", "text": "Colours?"}]},
                {"role": "assistant", "content": "red blue"}]}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "run"), "model": {"name": str(folder)},
        "adapter": {"r": 4, "lora_alpha": 8,
                    "target_modules": r"model\.text_model\..*\.(q_proj|v_proj)"},
        "data": {"train": str(tmp_path / "d.jsonl")},
        "train": {"max_steps": 3, "batch_size": 2, "lr": 2e-2, "warmup_ratio": 0.0}}))
    assert main(["train", str(config)]) == 0
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["packing"] is False
    from safetensors.torch import load_file
    adapter = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert any(float(v.abs().sum()) > 0 for k, v in adapter.items() if "lora_B" in k)
