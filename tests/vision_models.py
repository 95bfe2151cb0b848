"""Tiny vision-language model folders built from their transformers config classes, for the
tests of models/vision.py and of `loratune train` on image data."""

import torch
from families import TEMPLATES, family_tokenizer


def tiny_qwen2_5_vl(folder, seed=0):
    """Qwen2.5-VL at a tiny size: its config class, the Qwen2.5 tokenizer kind with the VL
    chat template, Qwen2-VL's image processor (patch 14, merge 2) limited to 56x56 pixels."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    tok = family_tokenizer("qwen2_5")
    tok.chat_template = (TEMPLATES / "qwen2_5_vl.jinja").read_text()
    ids = tok.convert_tokens_to_ids
    cfg = Qwen2_5_VLConfig(
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                           out_hidden_size=32, fullatt_block_indexes=[1], window_size=56),
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, eos_token_id=ids("<|im_end|>"),
                         bos_token_id=None, initializer_range=0.3,
                         pad_token_id=ids("<|endoftext|>"),
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [1, 1, 2]}),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        # Wider than the default 0.02: behind a final RMSNorm, the frozen output layer's row
        # norms cap the logits, so a 0.02-wide head cannot move the loss far from log(vocab).
        initializer_range=0.3)
    torch.manual_seed(seed)
    Qwen2_5_VLForConditionalGeneration(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56).save_pretrained(folder)
    return folder


IDEFICS3_TOKENS = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"] + [
    f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]


def tiny_idefics3(folder, seed=0):
    """Idefics3 (SmolVLM's architecture) at a tiny size: its config class (vision tiles of 32
    pixels, patch 8, pixel shuffle 2: 4 tokens a tile), a byte-level BPE tokenizer with the
    SmolVLM tokens and chat template (<end_of_utterance> ends a turn, its eos), and Idefics3's
    image processor splitting an image into 32-pixel tiles plus a global image."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil,
    )

    tok = family_tokenizer("qwen2_5")
    tok.add_special_tokens({"additional_special_tokens": IDEFICS3_TOKENS})
    tok.eos_token = "<end_of_utterance>"
    tok.chat_template = (TEMPLATES / "idefics3.jinja").read_text()
    cfg = Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8),
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=32,
                         intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=1024,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         initializer_range=0.3),
        image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=2,
        pad_token_id=tok.pad_token_id, initializer_range=0.3)  # wide: see tiny_qwen2_5_vl
    torch.manual_seed(seed)
    Idefics3ForConditionalGeneration(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                              do_image_splitting=True).save_pretrained(folder)
    return folder
