"""QLoRA of a vision-language model through the commands (issue 29): `loratune train` with
model.quantization on the tiny Qwen2.5-VL folder (language model in 4 bits, vision tower in the
compute dtype), then `loratune merge --qlora` of its adapter into a folder that loads as the
same architecture with the logits of the 4-bit model + adapter; `merge` without --qlora too."""

import json
import re

import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from vision_models import tiny_qwen2_5_vl

from loratune.adapters import load_adapter
from loratune.cli import main
from loratune.config import ModelConfig, QuantConfig, RunConfig
from loratune.models import load_model
from loratune.models.vision import FAMILIES, load_vision_model, vision_logits
from loratune.quant.linear4bit import Linear4bit
from loratune.quant.nf4 import dequantize_4bit, quantize_4bit
from loratune.train.loop import build_data

QWEN = FAMILIES["qwen2_5_vl"]
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    return tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen2_5_vl"))


def _config(tmp_path, folder, quantization, **adapter) -> RunConfig:
    rows = []
    for name, rgb in COLOURS.items():
        Image.new("RGB", (56, 56), rgb).save(tmp_path / f"{name}.png")
        rows.append({"messages": [{"role": "user", "content": "<image>Colour?"},
                                  {"role": "assistant", "content": name}],
                     "images": [f"{name}.png"]})
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = {"output_dir": str(tmp_path / "run"),
           "model": {"name": str(folder), "quantization": quantization},
           "adapter": {"r": 8, "lora_alpha": 16, "target_modules": "language", **adapter},
           "data": {"train": str(tmp_path / "d.jsonl")},
           "train": {"max_steps": 6, "batch_size": 3, "lr": 2e-2, "warmup_ratio": 0.0}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    return RunConfig.model_validate(raw)


@pytest.fixture(scope="module")
def qlora_run(qwen_folder, tmp_path_factory):
    """`loratune train` of a QLoRA adapter on image data: (run config, its adapter folder)."""
    tmp = tmp_path_factory.mktemp("qlora")
    cfg = _config(tmp, qwen_folder, {"type": "nf4", "compute_dtype": "float32"})
    assert main(["train", str(tmp / "run.yaml")]) == 0
    return cfg, tmp / "run" / "adapter"


def test_quantization_loads_the_language_model_in_4_bits(qwen_folder, tmp_path):
    cfg = _config(tmp_path, qwen_folder, {"type": "nf4", "compute_dtype": "float32"})
    model, tokenizer = load_model(cfg.model)
    four_bit = sorted(n for n, m in model.named_modules() if isinstance(m, Linear4bit))
    plain, _, _ = load_vision_model(qwen_folder)
    language = sorted(n for n, m in plain.named_modules()
                      if isinstance(m, torch.nn.Linear) and n.startswith(QWEN.language + "."))
    assert four_bit == language and len(four_bit) == 14
    vision = [m for n, m in model.named_modules()
              if n.startswith(QWEN.vision + ".") and isinstance(m, torch.nn.Linear)]
    assert vision and all(m.weight.dtype == torch.float32 for m in vision)
    assert tokenizer.image_encoder is not None  # image data is encoded for it as without 4 bits
    [ex, *_], _, _, _ = build_data(cfg, tokenizer)
    with torch.no_grad():  # = the fp32 model with only the language linears NF4-rounded
        for name in language:
            layer = plain.get_submodule(name)
            codes = quantize_4bit(layer.weight.float(), 64, "nf4", True)
            layer.weight.copy_(dequantize_4bit(codes, torch.float32))
        torch.testing.assert_close(vision_logits(model, ex), vision_logits(plain, ex),
                                   rtol=0, atol=1e-5)


def test_cli_trains_qlora_on_images(qlora_run):
    _, adapter = qlora_run
    lines = (adapter.parent / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in lines]
    assert len(losses) == 6 and losses[-1] < 0.6 * losses[0], losses
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
        moved = [k for k in keys if "lora_B" in k and float(f.get_tensor(k).abs().sum()) > 0]
    assert len(keys) == 2 * 14 and all(".language_model." in k for k in keys)
    assert len(moved) == 14


def _image_example(cfg, tokenizer):
    examples, _, _, _ = build_data(cfg, tokenizer)
    return examples[0]


def test_merge_qlora_equals_the_4bit_model_with_its_adapter(qlora_run, qwen_folder, tmp_path,
                                                            capsys):
    cfg, adapter = qlora_run
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(qwen_folder), "--adapter", str(adapter),
                 "--out", str(out), "--qlora", "nf4", "--check"]) == 0
    # --check: the merged folder against the 4-bit base + adapter, on a text sample
    gap = re.search(r"\(4-bit base\): (\S+)", capsys.readouterr().out)
    assert gap and float(gap.group(1)) < 1e-4
    live, tokenizer = load_model(ModelConfig(name=str(qwen_folder),
                                             quantization=QuantConfig(type="nf4")))
    load_adapter(live, adapter)
    example = _image_example(cfg, tokenizer)
    merged, _, _ = load_vision_model(out)
    assert type(merged).__name__ == "Qwen2_5_VLForConditionalGeneration"
    with safe_open(out / "model.safetensors", "pt") as f, \
            safe_open(qwen_folder / "model.safetensors", "pt") as g:
        assert set(f.keys()) == set(g.keys())  # written under the checkpoint's own names
    with torch.no_grad():
        want = vision_logits(live, example)
        torch.testing.assert_close(vision_logits(merged, example), want, rtol=0, atol=1e-4)
        plain, _, _ = load_vision_model(qwen_folder)
        load_adapter(plain, adapter)  # the same adapter on the fp32 base: not what it saw
        assert float((vision_logits(plain, example) - want).abs().max()) > 1e-3


def test_merge_of_a_vision_adapter_without_qlora(qwen_folder, tmp_path):
    """A LoRA on the language model plus the projector trained whole (modules_to_save)."""
    cfg = _config(tmp_path, qwen_folder, None, modules_to_save=["projector"])
    assert main(["train", str(tmp_path / "run.yaml")]) == 0
    adapter, out = tmp_path / "run" / "adapter", tmp_path / "merged"
    assert main(["merge", "--model", str(qwen_folder), "--adapter", str(adapter),
                 "--out", str(out)]) == 0
    live, tokenizer = load_model(cfg.model)
    load_adapter(live, adapter)
    example = _image_example(cfg, tokenizer)
    merged, _, _ = load_vision_model(out)
    base, _, _ = load_vision_model(qwen_folder)
    projector = "model.visual.merger.mlp.0.weight"
    assert not torch.equal(merged.state_dict()[projector], base.state_dict()[projector])
    with torch.no_grad():
        torch.testing.assert_close(vision_logits(merged, example), vision_logits(live, example),
                                   rtol=0, atol=1e-4)
