"""Vision-language models: load a local folder, encode (messages, images) the way the family's
processor does, with answer-only labels, and compute the loss.

The families' transformers processors (Qwen2_5_VLProcessor, SmolVLMProcessor) insist on a
video processor, which needs torchvision; the image processors have a Pillow backend that does
not. So a processor here is the tokenizer (with the family's chat template) plus the image
processor, and `encode_vision` does what the transformers processor does for images: render the
chat template, then widen each image placeholder to the image's number of tokens.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from loratune.data.encode import IGNORE, encode_conversation
from loratune.data.encode import ImageExample as VisionExample
from loratune.data.errors import DataError
from loratune.data.packing import PER_TOKEN_INPUTS
from loratune.readers import check_safetensors

_LINEAR_LEAVES = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"


@dataclass(frozen=True)
class VisionFamily:
    """Where a family keeps its parts (module paths) and how its images become tokens."""

    model_type: str
    image_token: str              # the placeholder the chat template writes once per image
    language: str                 # module path of the language model
    vision: str                   # module path of the vision tower
    projector: str                # module path of the vision-to-text projector
    # Families whose images are not a repeated placeholder (Idefics3's tiles and tags) encode
    # with their own function; image_seq_len (tokens per tile) is read from the model config.
    encode: Callable | None = None
    seq_len_of: Callable | None = None
    image_seq_len: int = 0
    # The per-token modality input the model reads (1 at image tokens), as the family's
    # processor returns it: Qwen3-VL's mm_token_type_ids (its 3-D rotary positions need them),
    # Gemma 3's token_type_ids (bidirectional attention within an image); "" for none.
    token_types: str = ""

    def language_targets(self) -> str:
        """adapter.target_modules for the language model's linear layers only (the default):
        a full-match regex, so the vision tower's and projector's layers are never chosen."""
        return rf"{re.escape(self.language)}\..*\.({_LINEAR_LEAVES})"




@dataclass(frozen=True)
class ImageEncoder:
    """What `loratune train` encodes image data with: the family's image processor and parts,
    kept on the tokenizer as `image_encoder` by models/load.py (data/ calls it, not imports it)."""

    image_processor: object
    family: VisionFamily

    def __call__(self, tokenizer, messages: list[dict], images: list,
                 max_length: int) -> VisionExample | None:
        return encode_vision(messages, images, tokenizer, self.image_processor, self.family,
                             max_length)


def vision_family(config) -> VisionFamily:
    family = FAMILIES.get(getattr(config, "model_type", None))
    if family is None:
        raise ValueError(f"model_type '{getattr(config, 'model_type', None)}' is not a supported "
                         f"vision-language family; expected one of {', '.join(FAMILIES)}")
    if family.seq_len_of is not None:
        family = replace(family, image_seq_len=family.seq_len_of(config))
    return family


def vision_model_type(folder: str | Path) -> str | None:
    """The model_type of a vision-language model folder (its config.json has a vision_config),
    refused by name when no family here reads it; None for a text model."""
    import json

    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # the text loader names what is wrong with it
    if not isinstance(config, dict) or "vision_config" not in config:
        return None
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"{path}: model_type '{model_type}' (architectures "
                         f"{config.get('architectures')}) is a vision-language model no family "
                         f"here reads; expected one of {', '.join(FAMILIES)}")
    return model_type


def load_vision_model(folder: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, image processor) from a local Hugging Face folder; safetensors only,
    nothing fetched."""
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    folder = Path(folder)
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights (pickle checkpoints are "
                                "not loaded)")
    for path in weights:
        check_safetensors(path)
    model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True,
                                                        dtype=dtype, use_safetensors=True)
    vision_family(model.config)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    images = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    return model.eval(), tokenizer, images


def encode_vision(messages: list[dict], images: list, tokenizer, image_processor,
                  family: VisionFamily, max_length: int = 2048,
                  template: str | None = None) -> VisionExample | None:
    """Answer-only labels over the chat template's text, each image placeholder widened to its
    image's token count and never labelled; None when longer than max_length (an image cannot
    be cut in half, so such a conversation is dropped, not truncated)."""
    if family.encode is not None:
        return family.encode(messages, images, tokenizer, image_processor, family, max_length,
                             template)
    template = template or tokenizer.chat_template
    enc = encode_conversation(messages, tokenizer, template, max_length=1 << 30).example
    if enc is None:
        return None
    image_id = tokenizer.convert_tokens_to_ids(family.image_token)
    inputs = dict(image_processor(images=images, return_tensors="pt")) if images else {}
    counts = _tokens_per_image(inputs, image_processor)
    if enc.input_ids.count(image_id) != len(counts):
        raise DataError(f"the chat template wrote {enc.input_ids.count(image_id)} "
                        f"{family.image_token} for {len(counts)} image(s); expected one each")
    ids, labels = _widen(enc.input_ids, enc.labels, image_id, counts)
    if len(ids) > max_length:
        return None
    return VisionExample(ids, labels, _with_token_types(inputs, family, ids, image_id))


def _with_token_types(inputs: dict, family: VisionFamily, ids: list[int],
                      image_id: int) -> dict:
    """inputs plus the family's per-token modality row (1 where ids holds image_id)."""
    if inputs and family.token_types:
        inputs[family.token_types] = torch.tensor([[int(t == image_id) for t in ids]])
    return inputs


def _tokens_per_image(inputs: dict, image_processor) -> list[int]:
    """Qwen2-VL's count: the image's patch grid (t*h*w) over merge_size**2 merged patches."""
    grid = inputs.get("image_grid_thw")
    if grid is None:
        return []
    merge = image_processor.merge_size ** 2
    return [int(g.prod()) // merge for g in grid]


def _widen(ids: list[int], labels: list[int], image_id: int,
           counts: list[int]) -> tuple[list[int], list[int]]:
    return _splice(ids, labels, image_id, [[image_id] * n for n in counts])


def idefics3_image_seq_len(config) -> int:
    """Tokens per image tile: the tile's patches after the connector's pixel shuffle
    (Idefics3Processor's image_seq_len)."""
    vision = config.vision_config
    return int((vision.image_size // vision.patch_size) ** 2 / config.scale_factor ** 2)


def encode_idefics3(messages: list[dict], images: list, tokenizer, image_processor,
                    family: VisionFamily, max_length: int = 2048,
                    template: str | None = None) -> VisionExample | None:
    """Idefics3 / SmolVLM: its template reads every turn's content as parts, and each <image>
    becomes the processor's text for the image's tiles (row/col tags, a global image), each
    tile image_seq_len <image> tokens; none of it labelled."""
    template = template or tokenizer.chat_template
    parts = [dict(m, content=_as_parts(m["content"])) for m in messages]
    enc = encode_conversation(parts, tokenizer, template, max_length=1 << 30).example
    if enc is None:
        return None
    inputs = dict(image_processor(images=[images], return_row_col_info=True,
                                  return_tensors="pt")) if images else {}
    tiles = list(zip(inputs.pop("rows", [[]])[0], inputs.pop("cols", [[]])[0]))
    image_id = tokenizer.convert_tokens_to_ids(family.image_token)
    if enc.input_ids.count(image_id) != len(tiles):
        raise DataError(f"the chat template wrote {enc.input_ids.count(image_id)} "
                        f"{family.image_token} for {len(tiles)} image(s); expected one each")
    expansions = [tokenizer(_idefics3_image_text(r, c, family.image_seq_len),
                            add_special_tokens=False)["input_ids"] for r, c in tiles]
    ids, labels = _splice(enc.input_ids, enc.labels, image_id, expansions)
    if len(ids) > max_length:
        return None
    return VisionExample(ids, labels, inputs)


def _as_parts(content) -> list[dict]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def _idefics3_image_text(rows: int, cols: int, seq_len: int) -> str:
    """Idefics3Processor.replace_image_token's text for one image of rows x cols tiles."""
    tile = "<image>" * seq_len
    whole = f"<fake_token_around_image><global-img>{tile}<fake_token_around_image>"
    if rows == 0 and cols == 0:
        return whole
    grid = "".join("".join(f"<fake_token_around_image><row_{r + 1}_col_{c + 1}>{tile}"
                           for c in range(cols)) + "\n" for r in range(rows))
    return f"{grid}\n{whole}"


def gemma3_image_seq_len(config) -> int:
    return int(config.mm_tokens_per_image)


def encode_gemma3(messages: list[dict], images: list, tokenizer, image_processor,
                  family: VisionFamily, max_length: int = 2048,
                  template: str | None = None) -> VisionExample | None:
    """Gemma 3: each <start_of_image> the template writes becomes Gemma3Processor's
    "\n\n<start_of_image>" + mm_tokens_per_image <image_soft_token> + "<end_of_image>\n\n",
    none of it labelled; token_type_ids mark the soft tokens (1), as the processor returns
    them (family.token_types), so each image attends to itself both ways."""
    template = template or tokenizer.chat_template
    parts = [dict(m, content=_as_parts(m["content"])) for m in messages]
    enc = encode_conversation(parts, tokenizer, template, max_length=1 << 30).example
    if enc is None:
        return None
    boi = tokenizer.convert_tokens_to_ids(family.image_token)
    if enc.input_ids.count(boi) != len(images):
        raise DataError(f"the chat template wrote {enc.input_ids.count(boi)} "
                        f"{family.image_token} for {len(images)} image(s); expected one each")
    soft = "<image_soft_token>" * family.image_seq_len
    text = f"\n\n{family.image_token}{soft}<end_of_image>\n\n"
    expansion = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids, labels = _splice(enc.input_ids, enc.labels, boi, [expansion] * len(images))
    if len(ids) > max_length:
        return None
    inputs = dict(image_processor(images=images, return_tensors="pt")) if images else {}
    if int(inputs.pop("num_crops", torch.zeros(1)).sum()):
        raise DataError("do_pan_and_scan in the Gemma 3 image processor's settings: its crops "
                        "are not encoded here; set it false in preprocessor_config.json")
    soft_id = tokenizer.convert_tokens_to_ids("<image_soft_token>")
    return VisionExample(ids, labels, _with_token_types(inputs, family, ids, soft_id))


def _splice(ids: list[int], labels: list[int], image_id: int,
            expansions: list[list[int]]) -> tuple[list[int], list[int]]:
    """Each image token replaced by its image's expansion, unlabelled."""
    out_ids, out_labels, k = [], [], 0
    for tok, label in zip(ids, labels):
        if tok == image_id:
            out_ids += expansions[k]
            out_labels += [IGNORE] * len(expansions[k])
            k += 1
        else:
            out_ids.append(tok)
            out_labels.append(label)
    return out_ids, out_labels


# --- LLaVA-1.5, LLaVA-NeXT, Llama 3.2 Vision (mllama) ---

def llava_image_seq_len(config) -> int:
    """Tokens per image tile: the CLIP tower's patches, plus its CLS feature unless the
    "default" feature selection drops it (LlavaProcessor's count with one additional token)."""
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches + int(config.vision_feature_select_strategy == "full")


def llava_next_image_seq_len(config) -> int:
    """Tokens of LLaVA-NeXT's base tile; the per-image count (`_llava_next_tokens`) reads the
    patches a side from it, so only "default" (the released checkpoints', CLS dropped) is read."""
    if config.vision_feature_select_strategy != "default":
        raise ValueError(f"config.json: vision_feature_select_strategy is "
                         f"'{config.vision_feature_select_strategy}'; LLaVA-NeXT is read with "
                         "'default' only (every released checkpoint's)")
    return llava_image_seq_len(config)


def encode_llava(messages: list[dict], images: list, tokenizer, image_processor,
                 family: VisionFamily, max_length: int = 2048,
                 template: str | None = None) -> VisionExample | None:
    """LLaVA-1.5: each <image> widened to image_seq_len tokens (the tile's CLIP patches).
    Its template (llava-hf's) ends an answer with a space, never with eos, so only the last
    answer would end in a labelled stop (the eos encode_conversation appends). LLaVA's own
    training (haotian-liu/LLaVA: conv_vicuna_v1, "ASSISTANT: answer</s>USER: ...", whose
    preprocess_v1 labels each answer with its </s>) teaches a stop after every answer, as
    here: each earlier answer ends with eos, labelled with it (serve/image_prompt.py encodes a
    request's history with this function too)."""
    template = template or tokenizer.chat_template
    if tokenizer.eos_token and tokenizer.eos_token not in template:
        messages = _stop_after_answers(messages, tokenizer.eos_token)
    return _encode_widened(messages, images, tokenizer, image_processor, family, max_length,
                           template, lambda inputs: [family.image_seq_len] * len(images))


def _stop_after_answers(messages: list[dict], eos: str) -> list[dict]:
    """Every assistant turn but the last message with `eos` after its last text part."""
    out = []
    for i, m in enumerate(messages):
        parts = list(_as_parts(m["content"])) if m["role"] == "assistant" else []
        texts = [j for j, p in enumerate(parts) if p.get("type") == "text"]
        if texts and i < len(messages) - 1:
            parts[texts[-1]] = dict(parts[texts[-1]], text=parts[texts[-1]]["text"] + eos)
            m = dict(m, content=parts)
        out.append(m)
    return out


def encode_llava_next(messages: list[dict], images: list, tokenizer, image_processor,
                      family: VisionFamily, max_length: int = 2048,
                      template: str | None = None) -> VisionExample | None:
    """LLaVA-NeXT: each <image> widened to its image's count, which follows the image's size
    (the pinpoint grid it is tiled into, unpadded to its aspect ratio, a newline a row)."""
    def counts(inputs: dict) -> list[int]:
        tile = inputs["pixel_values"].shape[-1]
        return [_llava_next_tokens(int(h), int(w), tile, math.isqrt(family.image_seq_len),
                                   image_processor.image_grid_pinpoints)
                for h, w in inputs["image_sizes"]]
    return _encode_widened(messages, images, tokenizer, image_processor, family, max_length,
                           template, counts)


def _llava_next_tokens(height: int, width: int, tile: int, side: int,
                       pinpoints: list[list[int]]) -> int:
    """LlavaNextProcessor._get_number_of_features for one image of height x width pixels
    (tiles of `tile` pixels, `side` x `side` features each), less the CLS "default" drops."""
    from transformers.image_processing_utils import select_best_resolution

    best_h, best_w = select_best_resolution([height, width], pinpoints)
    rows, cols = side * (best_h // tile), side * (best_w // tile)
    if width / height > cols / rows:  # wider than the grid: padding rows are cut
        rows -= 2 * ((rows - int(round(height * (cols / width), 7))) // 2)
    else:
        cols -= 2 * ((cols - int(round(width * (rows / height), 7))) // 2)
    return rows * cols + rows + side * side


def _encode_widened(messages: list[dict], images: list, tokenizer, image_processor,
                    family: VisionFamily, max_length: int, template: str | None,
                    counts: Callable) -> VisionExample | None:
    """The LLaVAs: their templates read every turn's content as parts; each image placeholder
    widened to counts(image inputs)[i] tokens, never labelled; the tokenizer's leading special
    tokens (<s>) put first, as the processor's tokenizer call adds them and the templates do
    not write them."""
    template = template or tokenizer.chat_template
    parts = [dict(m, content=_as_parts(m["content"])) for m in messages]
    enc = encode_conversation(parts, tokenizer, template, max_length=1 << 30).example
    if enc is None:
        return None
    inputs = dict(image_processor(images=images, return_tensors="pt")) if images else {}
    image_id = tokenizer.convert_tokens_to_ids(family.image_token)
    n = _check_placeholders(enc.input_ids, image_id, len(images), family)
    ids, labels = _widen(enc.input_ids, enc.labels, image_id, counts(inputs) if n else [])
    lead = tokenizer("", add_special_tokens=True)["input_ids"]
    if ids[:len(lead)] != lead:
        ids, labels = lead + ids, [IGNORE] * len(lead) + labels
    if len(ids) > max_length:
        return None
    return VisionExample(ids, labels, inputs)


def _check_placeholders(ids: list[int], image_id: int, images: int, family: VisionFamily) -> int:
    if ids.count(image_id) != images:
        raise DataError(f"the chat template wrote {ids.count(image_id)} {family.image_token} for "
                        f"{images} image(s); expected one each")
    return images


def encode_mllama(messages: list[dict], images: list, tokenizer, image_processor,
                  family: VisionFamily, max_length: int = 2048,
                  template: str | None = None) -> VisionExample | None:
    """Llama 3.2 Vision: an image stays one <|image|> token (never labelled: it is in a user
    turn); its tiles reach the text through cross-attention layers, and cross_attention_mask
    says which tokens see which image's tiles: the tokens from its <|image|> on, up to the
    next image (MllamaProcessor's rule; consecutive images are seen together)."""
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense, get_cross_attention_token_mask)

    template = template or tokenizer.chat_template
    enc = encode_conversation(messages, tokenizer, template, max_length=1 << 30).example
    if enc is None or len(enc.input_ids) > max_length:
        return None
    image_id = tokenizer.convert_tokens_to_ids(family.image_token)
    _check_placeholders(enc.input_ids, image_id, len(images), family)
    if not images:
        return VisionExample(enc.input_ids, enc.labels, {})
    inputs = dict(image_processor(images=[images], return_tensors="pt"))
    tiles = inputs.pop("num_tiles")
    spans = [get_cross_attention_token_mask(enc.input_ids, image_id)]
    mask = convert_sparse_cross_attention_mask_to_dense(
        spans, tiles, image_processor.max_image_tiles, len(enc.input_ids))
    inputs["cross_attention_mask"] = torch.from_numpy(mask)
    return VisionExample(enc.input_ids, enc.labels, inputs)


FAMILIES = {
    "qwen2_5_vl": VisionFamily("qwen2_5_vl", "<|image_pad|>", "model.language_model",
                               "model.visual", "model.visual.merger",
                               token_types="mm_token_type_ids"),
    "idefics3": VisionFamily("idefics3", "<image>", "model.text_model", "model.vision_model",
                             "model.connector", encode=encode_idefics3,
                             seq_len_of=idefics3_image_seq_len),
    # SmolVLM: Idefics3's architecture under its own classes; the same image text.
    "smolvlm": VisionFamily("smolvlm", "<image>", "model.text_model", "model.vision_model",
                            "model.connector", encode=encode_idefics3,
                            seq_len_of=idefics3_image_seq_len),
    "gemma3": VisionFamily("gemma3", "<start_of_image>", "model.language_model",
                           "model.vision_tower", "model.multi_modal_projector",
                           encode=encode_gemma3, seq_len_of=gemma3_image_seq_len,
                           token_types="token_type_ids"),
    # Qwen3-VL: Qwen2.5-VL's placeholder (grid t*h*w / merge**2 tokens an image). Its deepstack
    # mergers (model.visual.deepstack_merger_list) feed vision-block features into early text
    # layers; they sit under `vision`, the final merger is the projector.
    "qwen3_vl": VisionFamily("qwen3_vl", "<|image_pad|>", "model.language_model",
                             "model.visual", "model.visual.merger",
                             token_types="mm_token_type_ids"),
    "llava": VisionFamily("llava", "<image>", "model.language_model", "model.vision_tower",
                          "model.multi_modal_projector", encode=encode_llava,
                          seq_len_of=llava_image_seq_len),
    "llava_next": VisionFamily("llava_next", "<image>", "model.language_model",
                               "model.vision_tower", "model.multi_modal_projector",
                               encode=encode_llava_next, seq_len_of=llava_next_image_seq_len),
    # Llama 3.2 Vision: no placeholder widening; its text layers include cross-attention ones
    # (q/k/v/o_proj too: they are language-model linears, adapted and quantized as such).
    "mllama": VisionFamily("mllama", "<|image|>", "model.language_model", "model.vision_model",
                           "model.multi_modal_projector", encode=encode_mllama),
}


def last_answer_start(messages: list[dict], labels: list[int]) -> int | None:
    """Where the last assistant turn's labelled run starts: its generation prompt's length.
    Each labelled assistant turn (not one opening the conversation) is one run, so it is the
    start of run number (assistant turns); a run after it (an eos the encoding appends after
    a template's own end, as Gemma's `<end_of_turn>\n`) is not an answer. None: no such run."""
    turns = sum(1 for i, m in enumerate(messages) if i and m.get("role") == "assistant")
    runs = [i for i, label in enumerate(labels)
            if label != IGNORE and (i == 0 or labels[i - 1] == IGNORE)]
    return runs[turns - 1] if 0 < turns <= len(runs) else None


def prompt_image_inputs(example: VisionExample, length: int) -> dict:
    """The image inputs of the example's first `length` tokens (a generation prompt): the
    per-token rows (token_type_ids, mm_token_type_ids) cut with the ids."""
    return {k: v[:, :length] if k in PER_TOKEN_INPUTS else v
            for k, v in example.image_inputs.items()}


def vision_loss(model, example: VisionExample) -> torch.Tensor:
    """The mean next-token loss of one example (batch of one: images differ in token count)."""
    device = next(model.parameters()).device
    ids = torch.tensor([example.input_ids], device=device)
    labels = torch.tensor([example.labels], device=device)
    extra = {k: v.to(device) for k, v in example.image_inputs.items()}
    return model(input_ids=ids, labels=labels, **extra).loss


def vision_logits(model, example: VisionExample) -> torch.Tensor:
    device = next(model.parameters()).device
    extra = {k: v.to(device) for k, v in example.image_inputs.items()}
    return model(input_ids=torch.tensor([example.input_ids], device=device), **extra).logits
