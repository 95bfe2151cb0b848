"""A tiny Qwen2.5-VL built from its config class: load, encode with answer-only labels (image
tokens never labelled), LoRA on the language model only, train, save, reload, merge."""

import json
import shutil

import pytest
import torch
from vision_models import tiny_qwen2_5_vl
from PIL import Image

from loratune.adapters import load_adapter, merge_and_unload, save_adapter
from loratune.config.methods import LoraConfig
from loratune.data.encode import IGNORE
from loratune.models.vision import FAMILIES, encode_vision, load_vision_model, vision_logits
from loratune.recipes.vision import encode_records, setup_adapter, train_vision

QWEN = FAMILIES["qwen2_5_vl"]
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
           "yellow": (255, 255, 0)}


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    return tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen2_5_vl"))


def _colour_task(folder):
    """4 examples: a plain-colour image, "Colour?" -> its name (a data file with images beside
    it, as users write them)."""
    rows = []
    for name, rgb in COLOURS.items():
        Image.new("RGB", (56, 56), rgb).save(folder / f"{name}.png")
        rows.append({"messages": [{"role": "user", "content": "<image>Colour?"},
                                  {"role": "assistant", "content": name}],
                     "images": [f"{name}.png"]})
    path = folder / "colours.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, [(n + 1, r) for n, r in enumerate(rows)]


def test_loads_and_encodes_images_never_labelled(qwen_folder, tmp_path):
    model, tok, images = load_vision_model(qwen_folder)
    path, records = _colour_task(tmp_path)
    two = {"messages": [{"role": "user", "content": [
        {"type": "image", "image": "red.png"}, {"type": "text", "text": "and"},
        {"type": "image_url", "image_url": {"url": "blue.png"}}]},
        {"role": "assistant", "content": "red blue"},
        {"role": "user", "content": "<image>?"}, {"role": "assistant", "content": "green"}],
        "images": None}
    with pytest.raises(Exception, match="marker"):  # markers need the images column
        encode_records([(9, two)], path, tok, images, QWEN)
    two["messages"][2]["content"] = [{"type": "image", "image": "green.png"},
                                     {"type": "text", "text": "?"}]
    [ex] = encode_records([(9, two)], path, tok, images, QWEN)
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    per_image = (56 // 14) ** 2 // 4  # a 56x56 image: 4x4 patches, 2x2 merged -> 4 tokens
    assert ex.input_ids.count(pad) == 3 * per_image
    assert ex.image_inputs["image_grid_thw"].tolist() == [[1, 4, 4]] * 3
    for tok_id, label in zip(ex.input_ids, ex.labels):
        if tok_id == pad:
            assert label == IGNORE
    taught = [t for t, label in zip(ex.input_ids, ex.labels) if label != IGNORE]
    assert tok.decode(taught) == "red blue<|im_end|>green<|im_end|>"
    logits = vision_logits(model, ex)
    assert logits.shape == (1, len(ex.input_ids), len(tok))


def test_lora_on_language_model_only_by_default(qwen_folder):
    model, _, _ = load_vision_model(qwen_folder)
    every = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert any(n.startswith(QWEN.vision + ".") for n in every)  # there is a vision side to avoid
    targets = setup_adapter(model)
    assert targets and all(t.startswith(QWEN.language + ".") for t in targets)
    assert len(targets) == 2 * 7  # 2 layers x q k v o gate up down
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not any(".visual." in n or n.startswith("lm_head") for n in trainable)


def test_train_save_reload_merge(qwen_folder, tmp_path):
    model, tok, images = load_vision_model(qwen_folder)
    path, records = _colour_task(tmp_path)
    examples = encode_records(records, path, tok, images, QWEN)
    assert len(examples) == 4
    setup_adapter(model, LoraConfig(target_modules=QWEN.language_targets(), r=8, lora_alpha=16))
    losses = train_vision(model, examples, steps=24, lr=2e-2, batch=4)
    assert losses[-1] < 0.5 * losses[0], losses
    with torch.no_grad():
        trained = [vision_logits(model, ex) for ex in examples]
    save_adapter(model, tmp_path / "adapter")

    fresh, _, _ = load_vision_model(qwen_folder)
    load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        for ex, want in zip(examples, trained):
            torch.testing.assert_close(vision_logits(fresh, ex), want, rtol=0, atol=1e-5)
        merged = merge_and_unload(fresh)
        for ex, want in zip(examples, trained):
            torch.testing.assert_close(vision_logits(merged, ex), want, rtol=1e-4, atol=1e-4)
    # The merged model saves as a plain folder that loads as the same architecture.
    merged.save_pretrained(tmp_path / "merged")
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        shutil.copy(qwen_folder / name, tmp_path / "merged" / name)
    again, _, _ = load_vision_model(tmp_path / "merged")
    assert type(again).__name__ == "Qwen2_5_VLForConditionalGeneration"
    with torch.no_grad():
        torch.testing.assert_close(vision_logits(again, examples[0]), trained[0], rtol=1e-4,
                                   atol=1e-4)


def test_loader_refuses_folder_without_safetensors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        load_vision_model(tmp_path)
