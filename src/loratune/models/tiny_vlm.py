"""The bundled tiny vision-language model, `model.name: tiny-vlm`: Qwen2.5-VL's architecture at a
tiny size with random weights (seed 0), built from its transformers config class into a cache
folder on first use, so `loratune train`, `eval` and `serve --model` read it as any local folder.

Why it exists: no real vision-language model can be installed from a package registry here (the
smallest, SmolVLM-256M, is on a model hub only), and the vision demo (examples/vision.yaml) has
to run offline. Its tokenizer is byte-level BPE without merges (every byte a token, plus
Qwen2.5-VL's special tokens), so any text encodes; its chat template is Qwen2.5-VL's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from loratune.files import write_atomic_dir

TINY_VLM = "tiny-vlm"
SEED = 0
# Qwen2.5-VL's special tokens, in its order; the byte tokens come after them
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
            "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen2.5-VL's chat template (images as <|vision_start|><|image_pad|><|vision_end|>)
TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MAX_PIXELS = 56 * 56  # images are resized to at most 56x56: 16 patches of 14, 4 image tokens


def tiny_vlm_folder(cache: Path) -> Path:
    """The model's folder under `cache`, built once (temp folder, then renamed)."""
    out = cache / "models" / TINY_VLM
    if not (out / "config.json").is_file():
        write_atomic_dir(out, build_tiny_vlm, overwrite=True)
    return out


def byte_tokenizer():
    """A fast tokenizer whose vocabulary is the specials then the 256 byte-level symbols."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(SPECIALS + sorted(symbols))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=TEMPLATE,
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   model_max_length=1024)


def tiny_vlm_config(tokenizer):
    """Qwen2.5-VL's config at a tiny size: text hidden 64 (2 layers), vision hidden 32."""
    from transformers import Qwen2_5_VLConfig

    ids = tokenizer.convert_tokens_to_ids
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=1024, eos_token_id=ids("<|im_end|>"), bos_token_id=None,
                pad_token_id=ids("<|endoftext|>"), initializer_range=0.3,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [2, 3, 3]})  # head_dim 16: 8 rotary pairs
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  fullatt_block_indexes=[1], window_size=56)
    # A wider init than the default 0.02: the frozen output layer's row norms cap the logits
    # behind the final RMSNorm, and a 0.02-wide head leaves an adapter little to move.
    return Qwen2_5_VLConfig(
        vision_config=vision, text_config=text, initializer_range=0.3,
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))


def build_tiny_vlm(folder: Path) -> None:
    """Write the model (seed 0), its tokenizer and its image processor into `folder`."""
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    tokenizer = byte_tokenizer()
    config = tiny_vlm_config(tokenizer)
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(eos_token_id=config.text_config.eos_token_id,
                                               pad_token_id=config.text_config.pad_token_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=MAX_PIXELS).save_pretrained(folder)
    (Path(folder) / "SOURCE").write_text(f"built by loratune.models.tiny_vlm (seed {SEED})\n")
