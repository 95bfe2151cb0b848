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

    return _idefics3_shape(folder, seed, Idefics3Config, Idefics3ForConditionalGeneration,
                           Idefics3ImageProcessorPil)


def _idefics3_shape(folder, seed, config_class, model_class, processor_class):
    """The tiny Idefics3 shape (SmolVLM's too) built with the family's own classes."""
    tok = family_tokenizer("qwen2_5")
    tok.add_special_tokens({"additional_special_tokens": IDEFICS3_TOKENS})
    tok.eos_token = "<end_of_utterance>"
    tok.chat_template = (TEMPLATES / "idefics3.jinja").read_text()
    cfg = config_class(
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
    model_class(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    processor_class(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                    do_image_splitting=True).save_pretrained(folder)
    return folder


# --- Gemma 3 (vision), SmolVLM, Qwen3-VL (brief VA) ---

GEMMA3_IMAGE_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                       "image_token": "<image_soft_token>"}


def tiny_gemma3(folder, seed=0):
    """Gemma 3 with its SigLIP tower at a tiny size: 32-pixel images, patch 8 (16 patches)
    average-pooled to mm_tokens_per_image=4 soft tokens; the Gemma 3 tokenizer kind and chat
    template (<start_of_image> where an image goes) plus <image_soft_token>, named as the real
    tokenizer names them (boi/eoi/image token); Gemma3's image processor (no pan and scan,
    mean/std 0.5) resizing to 32x32 as the real one does to 896x896."""
    from families import family_config
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tok = family_tokenizer("gemma3")
    tok.add_special_tokens({"additional_special_tokens": ["<image_soft_token>"]})
    tok._set_model_specific_special_tokens(special_tokens=GEMMA3_IMAGE_TOKENS)
    tok.chat_template = (TEMPLATES / "gemma3.jinja").read_text()
    text = family_config("gemma3", len(tok), tok).to_dict()
    text.update(initializer_range=0.3)  # wide: see tiny_qwen2_5_vl
    ids = tok.convert_tokens_to_ids
    cfg = Gemma3Config(
        text_config=text,
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8),
        mm_tokens_per_image=4, boi_token_index=ids("<start_of_image>"),
        eoi_token_index=ids("<end_of_image>"), image_token_index=ids("<image_soft_token>"),
        initializer_range=0.3)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(cfg)
    # transformers initialises the projector's matrix to zeros (a checkpoint overwrites it):
    # left so, every image would become the same soft tokens and no test could see an image.
    torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.3)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    Gemma3ImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.5] * 3,
                            image_std=[0.5] * 3, do_pan_and_scan=False).save_pretrained(folder)
    return folder


def tiny_smolvlm(folder, seed=0):
    """SmolVLM (model_type smolvlm, its own config, model and image processor classes) at the
    tiny Idefics3 shape: SmolVLM shares Idefics3's image text (tiles, row/col tags, global
    image) and its chat template is the one tiny_idefics3 uses."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    return _idefics3_shape(folder, seed, SmolVLMConfig, SmolVLMForConditionalGeneration,
                           SmolVLMImageProcessorPil)


def tiny_qwen3_vl(folder, seed=0):
    """Qwen3-VL at a tiny size: its config class (patch 16, merge 2, a deepstack merger after
    vision block 0), the Qwen tokenizer kind with the Qwen3-VL-Instruct chat template (written
    here from the Thinking model's published one without its <think> handling, which is how
    the Instruct one differs; no default system prompt, unlike Qwen2.5-VL), and Qwen3-VL's
    image processor settings (Qwen2-VL's processor with patch 16, mean/std 0.5) limited to
    64x64 pixels: 4x4 patches, 4 tokens an image."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    tok = family_tokenizer("qwen2_5")
    tok.chat_template = (TEMPLATES / "qwen3_vl.jinja").read_text()
    ids = tok.convert_tokens_to_ids
    cfg = Qwen3VLConfig(
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                           out_hidden_size=32, num_position_embeddings=16,
                           deepstack_visual_indexes=[0]),
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=8, max_position_embeddings=512,
                         eos_token_id=ids("<|im_end|>"), bos_token_id=None,
                         pad_token_id=ids("<|endoftext|>"), initializer_range=0.3,
                         rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                          "mrope_section": [2, 1, 1],
                                          "mrope_interleaved": True}),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        initializer_range=0.3)  # wide: see tiny_qwen2_5_vl
    torch.manual_seed(seed)
    Qwen3VLForConditionalGeneration(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=2, merge_size=2,
                             image_mean=[0.5] * 3, image_std=[0.5] * 3,
                             min_pixels=32 * 32, max_pixels=64 * 64).save_pretrained(folder)
    return folder


# --- LLaVA-1.5, LLaVA-NeXT, Llama 3.2 Vision / mllama (brief VB) ---

# CLIP ViT-L/14 at 336 pixels, the tower of both LLaVAs, at 28 pixels: 2x2 patches of 14.
_CLIP_TINY = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14,
                  projection_dim=32)


def _llava_tokenizer(template: str):
    """The Llama-2 / Mistral SentencePiece kind (<s> prepended by the tokenizer, </s>) plus the
    <image> and <pad> tokens the llava-hf checkpoints add; the family's chat template."""
    tok = family_tokenizer("mistral_v0_3")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"], "pad_token": "<pad>"})
    tok.chat_template = (TEMPLATES / template).read_text()
    return tok


def _llava_text(tok):
    return dict(model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=1024, eos_token_id=tok.eos_token_id,
                bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
                initializer_range=0.3)  # wide: see tiny_qwen2_5_vl


def tiny_llava(folder, seed=0):
    """LLaVA-1.5 (llava-hf/llava-1.5-7b-hf's settings) at a tiny size: CLIP tower, the
    penultimate layer's patch features without CLS ("default"), a two-layer GELU projector,
    4 <image> tokens an image; CLIP's image processor (resize the short side, centre crop
    to the tower's 28 pixels) and llava-1.5's chat template (USER: / ASSISTANT:)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = _llava_tokenizer("llava.jinja")
    cfg = LlavaConfig(vision_config=dict(_CLIP_TINY), text_config=_llava_text(tok),
                      image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=4,
                      vision_feature_select_strategy="default", vision_feature_layer=-2,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 28},
                          crop_size={"height": 28, "width": 28}).save_pretrained(folder)
    return folder


# llava-v1.6's pinpoints ([336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]) over 12.
LLAVA_NEXT_PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]


def tiny_llava_next(folder, seed=0):
    """LLaVA-NeXT (llava-hf/llava-v1.6-mistral-7b-hf's settings) at a tiny size: an image is
    resized into the best-fitting pinpoint grid of 28-pixel tiles plus a base tile, its
    features unpadded to the image's aspect ratio with an image_newline per row, so the
    <image> count follows the image's size; Mistral's tokenizer kind and the 1.6 template."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil,
    )

    tok = _llava_tokenizer("llava_next.jinja")
    cfg = LlavaNextConfig(vision_config=dict(_CLIP_TINY), text_config=_llava_text(tok),
                          image_token_index=tok.convert_tokens_to_ids("<image>"),
                          image_grid_pinpoints=LLAVA_NEXT_PINPOINTS, image_seq_length=4,
                          vision_feature_select_strategy="default", vision_feature_layer=-2,
                          pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    LlavaNextForConditionalGeneration(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    LlavaNextImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                               image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
                               do_pad=True).save_pretrained(folder)
    return folder


def tiny_mllama(folder, seed=0, cross_attention_layers=(1,)):
    """Llama 3.2 Vision (mllama) at a tiny size: images enter through a cross-attention layer
    (text layer 1 of 2), not through placeholder tokens; its tiled vision encoder (28-pixel
    tiles, up to 4 tiles an image, aspect-ratio embeddings, a global encoder); the Llama 3
    tokenizer kind plus <|image|>, and Llama-3.2-11B-Vision-Instruct's chat template.
    cross_attention_layers=(0,): a text layer follows the cross-attention one, as in the real
    model (layers 3, 8, 13, ...), so what the image gives a token reaches the tokens after it."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    tok = family_tokenizer("llama3_2")
    tok.add_special_tokens({"additional_special_tokens": ["<|image|>"]})
    tok.chat_template = (TEMPLATES / "mllama.jinja").read_text()
    ids = tok.convert_tokens_to_ids
    cfg = MllamaConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_global_layers=1, attention_heads=2, image_size=28, patch_size=14,
                           max_num_tiles=4, intermediate_layers_indices=[0],
                           vision_output_dim=64),
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         cross_attention_layers=list(cross_attention_layers),
                         max_position_embeddings=1024,
                         bos_token_id=tok.bos_token_id, eos_token_id=ids("<|eot_id|>"),
                         pad_token_id=ids("<|finetune_right_pad_id|>"), initializer_range=0.3,
                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
        image_token_index=ids("<|image|>"))
    torch.manual_seed(seed)
    MllamaForConditionalGeneration(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    MllamaImageProcessorPil(size={"height": 28, "width": 28},
                            max_image_tiles=4).save_pretrained(folder)
    return folder
