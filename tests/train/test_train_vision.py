"""`loratune train run.yaml` on a tiny Qwen2.5-VL folder with image data: routed to the
vision loader, images encoded and batched (pixel_values, image_grid_thw, padded rows), saved,
resumed, and the adapter folder reloading with the trained logits."""

import json
import shutil

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from vision_models import tiny_qwen2_5_vl

from loratune.adapters import load_adapter
from loratune.cli import main
from loratune.config import RunConfig
from loratune.data.packing import collate_images
from loratune.models import load_model
from loratune.models.vision import load_vision_model, vision_logits
from loratune.train.loop import build_data, train

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
           "yellow": (255, 255, 0)}


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    return tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen2_5_vl"))


def _data(folder):
    """Colour questions of different lengths (rows of a batch differ), one with two images."""
    rows = []
    for n, (name, rgb) in enumerate(COLOURS.items()):
        Image.new("RGB", (56, 56), rgb).save(folder / f"{name}.png")
        question = "Colour?" + " Say it in one word." * n
        rows.append({"messages": [{"role": "user", "content": "<image>" + question},
                                  {"role": "assistant", "content": name}],
                     "images": [f"{name}.png"]})
    rows.append({"messages": [{"role": "user", "content": [
        {"type": "image", "image": "red.png"}, {"type": "image", "image": "blue.png"},
        {"type": "text", "text": "Colours?"}]}, {"role": "assistant", "content": "red blue"}]})
    path = folder / "colours.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(tmp_path, qwen_folder, **train):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "run"), "model": {"name": str(qwen_folder)},
        "adapter": {"r": 4, "lora_alpha": 8,
                    "target_modules": r"model\.language_model\..*\.(q_proj|v_proj)"},
        "data": {"train": str(_data(tmp_path))},
        "train": {"max_steps": 4, "batch_size": 2, "lr": 2e-2, "warmup_ratio": 0.0, **train}}))
    return path


def _adapter(folder):
    return load_file(folder / "adapter_model.safetensors")


def test_cli_trains_saves_and_resumes_on_images(tmp_path, qwen_folder):
    config = _config(tmp_path, qwen_folder, save_every=2)
    assert main(["train", str(config)]) == 0
    whole = _adapter(tmp_path / "run" / "adapter")
    assert any(float(v.abs().sum()) > 0 for k, v in whole.items() if "lora_B" in k)
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["packing"] is False
    # Pretend the run died right after its step-2 checkpoint: resumed, the same adapter.
    out = tmp_path / "run"
    (out / "run_summary.json").unlink()
    shutil.rmtree(out / "adapter")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]
    assert main(["train", str(config), "--resume"]) == 0
    resumed = _adapter(tmp_path / "run" / "adapter")
    assert resumed.keys() == whole.keys()
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=0, atol=1e-6)


def test_packing_true_is_refused_by_name(tmp_path, qwen_folder, capsys):
    config = _config(tmp_path, qwen_folder)
    assert main(["train", str(config), "data.packing=true"]) == 2
    assert "data.packing: true with a vision-language model" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_trained_adapter_reloads_with_equal_logits(tmp_path, qwen_folder):
    cfg = RunConfig.model_validate(yaml.safe_load(_config(tmp_path, qwen_folder).read_text()))
    model, tokenizer = load_model(cfg.model)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    result = train(cfg, model=model, tokenizer=tokenizer, quiet=True)
    examples, _, _, _ = build_data(cfg, tokenizer)
    assert len(examples) == 5 and examples[4].image_inputs["image_grid_thw"].shape[0] == 2
    with torch.no_grad():
        trained = [vision_logits(model, ex) for ex in examples]
    fresh, _, _ = load_vision_model(qwen_folder)
    load_adapter(fresh, result.adapter_dir)
    with torch.no_grad():
        for ex, want in zip(examples, trained):
            torch.testing.assert_close(vision_logits(fresh, ex), want, rtol=0, atol=1e-5)


def test_a_padded_image_batch_gives_each_row_its_own_loss(qwen_folder, tmp_path):
    """Rows of different lengths and image counts in one batch: each row's logits are the
    ones it has alone (padding masked, 3-D positions and images matched to their rows)."""
    cfg = RunConfig.model_validate(yaml.safe_load(_config(tmp_path, qwen_folder).read_text()))
    model, tokenizer = load_model(cfg.model)
    examples, _, _, _ = build_data(cfg, tokenizer)
    short, long_ = examples[4], examples[3]  # two images, short text; one image, long text
    assert len(short) != len(long_)
    batch = collate_images([[short], [long_]], tokenizer.pad_token_id)
    assert batch["image_grid_thw"].shape[0] == 3 and "position_ids" not in batch
    assert batch["attention_mask"].sum(1).tolist() == [len(short), len(long_)]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        together = model(**inputs).logits
        for row, ex in enumerate([short, long_]):
            alone = vision_logits(model, ex)[0]
            torch.testing.assert_close(together[row, :len(ex)], alone, rtol=1e-4, atol=1e-4)


def test_an_unknown_vision_family_is_refused_by_name(tmp_path, qwen_folder):
    folder = tmp_path / "other"
    shutil.copytree(qwen_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="paligemma", architectures=["PaliGemmaForConditionalGeneration"])
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json: model_type 'paligemma' .*PaliGemma.* "
                                         r"expected one of qwen2_5_vl"):
        load_model(str(folder))
