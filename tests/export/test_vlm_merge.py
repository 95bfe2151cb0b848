"""`loratune merge` of a vision-language adapter whose rank_pattern/alpha_pattern name modules
by path: the patterns follow the tensors to the checkpoint's names (LLaVA stores
`language_model.model.layers...` for the loaded `model.language_model.layers...`)."""

import json

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from vision_models import tiny_llava

from loratune.adapters import load_adapter, save_adapter
from loratune.cli import main
from loratune.config.methods import LoraConfig
from loratune.export.vlm_merge import vision_checkpoint
from loratune.models.vision import encode_vision, load_vision_model, vision_family, vision_logits
from loratune.recipes.vision import setup_adapter

LAYER0 = "model.language_model.layers.0"
FULL_RANK = f"{LAYER0}.self_attn.v_proj"          # a full path in rank_pattern (r 8 -> 4)
FULL_ALPHA = f"{LAYER0}.self_attn.q_proj"         # a full path in alpha_pattern
SHORT_ALPHA = "language_model.layers.1.mlp.down_proj"  # matches the loaded name only


def _adapter_with_patterns(folder, out):
    """A LoRA adapter on the language model (B random), then one module cut to rank 4 and two
    alphas set by path in its adapter_config.json, as a trained adapter's file has them."""
    model, _, _ = load_vision_model(folder)
    setup_adapter(model, LoraConfig(target_modules="language", r=8, lora_alpha=16))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
    save_adapter(model, out)
    weights = out / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = f"base_model.model.{FULL_RANK}.lora_"
    tensors[key + "A.weight"] = tensors[key + "A.weight"][:4].contiguous()
    tensors[key + "B.weight"] = tensors[key + "B.weight"][:, :4].contiguous()
    save_file(tensors, weights)
    config = json.loads((out / "adapter_config.json").read_text())
    config.update(rank_pattern={FULL_RANK: 4}, alpha_pattern={FULL_ALPHA: 3.0, SHORT_ALPHA: 40.0})
    (out / "adapter_config.json").write_text(json.dumps(config))


def test_patterns_by_module_path_are_renamed_on_merge(tmp_path):
    folder = tiny_llava(tmp_path / "llava")
    _adapter_with_patterns(folder, tmp_path / "adapter")
    base, tokenizer, images = load_vision_model(folder)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hue?"}]},
                {"role": "assistant", "content": "red"}]
    example = encode_vision(messages, [Image.new("RGB", (28, 28), (255, 0, 0))], tokenizer,
                            images, vision_family(base.config))
    load_adapter(base, tmp_path / "adapter")
    with torch.no_grad():
        want = vision_logits(base, example)

    out = tmp_path / "merged"
    assert main(["merge", "--model", str(folder), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(out)]) == 0
    merged, _, _ = load_vision_model(out)
    with torch.no_grad():
        torch.testing.assert_close(vision_logits(merged, example), want, rtol=1e-4, atol=1e-4)


def test_rename_pattern_keys():
    """Full paths (and AdaLoRA's `<module>.lora_E`) take the stored name; a shorter key that
    no longer matches becomes exact keys where it stood; leaf names and regexes stay."""
    from loratune.export.vlm_merge import VisionCheckpoint

    names = {f"{LAYER0}.self_attn.{p}.weight": f"language_model.model.layers.0.self_attn.{p}.weight"
             for p in ("q_proj", "v_proj")}
    check = VisionCheckpoint(names, frozenset())
    paths = [f"{LAYER0}.self_attn.q_proj", f"{LAYER0}.self_attn.v_proj"]
    pattern = {"language_model.layers.0.self_attn.v_proj": 2, f"{LAYER0}.self_attn.q_proj": 3,
               f"{LAYER0}.self_attn.v_proj.lora_E": [True], "q_proj": 5, r".*\.k_proj": 6}
    assert check.rename_pattern(pattern, paths) == {
        r"language_model\.model\.layers\.0\.self_attn\.v_proj": 2,
        "language_model.layers.0.self_attn.v_proj": 2,
        "language_model.model.layers.0.self_attn.q_proj": 3,
        "language_model.model.layers.0.self_attn.v_proj.lora_E": [True],
        "q_proj": 5, r".*\.k_proj": 6}


def test_vision_checkpoint_names_differ_for_llava(tmp_path):
    """The premise: LLaVA's stored names are not its loaded ones (else nothing is renamed)."""
    names = vision_checkpoint(tiny_llava(tmp_path / "llava")).names
    assert names[f"{FULL_ALPHA}.weight"] == "language_model.model.layers.0.self_attn.q_proj.weight"
