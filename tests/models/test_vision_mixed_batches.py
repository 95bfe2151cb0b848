"""Text-only rows batched with image rows, for every vision family: each row's loss in a
training batch equals its loss alone (fp32, 1e-5), whatever the order of the rows. Families
whose images are tokens mix any rows in a batch; mllama (images through cross-attention) gets
batches of rows with as many images (data/packing.image_batches says why)."""

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from vision_models import (tiny_gemma3, tiny_idefics3, tiny_llava, tiny_llava_next, tiny_mllama,
                           tiny_qwen2_5_vl, tiny_qwen3_vl, tiny_smolvlm)

from loratune.data.encode import IGNORE
from loratune.data.packing import batches, collate_images, image_batches
from loratune.models.vision import encode_vision, load_vision_model, vision_family, vision_loss

BUILDERS = {"qwen2_5_vl": tiny_qwen2_5_vl, "idefics3": tiny_idefics3, "gemma3": tiny_gemma3,
            "smolvlm": tiny_smolvlm, "qwen3_vl": tiny_qwen3_vl, "llava": tiny_llava,
            "llava_next": tiny_llava_next, "mllama": tiny_mllama}
TOKEN_FAMILIES = [name for name in BUILDERS if name != "mllama"]


def _ask(question: str, answer: str, images: int) -> list[dict]:
    parts = [{"type": "image"}] * images + [{"type": "text", "text": question}]
    return [{"role": "user", "content": parts}, {"role": "assistant", "content": answer}]


TEXT = _ask("Say hello to the world, please", "Hello, world!", images=0)
SHORT_TEXT = _ask("Hi", "Hello", images=0)
ONE = (_ask("Colour?", "red", images=1), [Image.new("RGB", (60, 24), (255, 0, 0))])
TWO = (_ask("Compare", "red, blue", images=2),
       [Image.new("RGB", (60, 24), (255, 0, 0)), Image.new("RGB", (20, 50), (0, 0, 255))])


@pytest.fixture(scope="module", params=list(BUILDERS))
def loaded(request, tmp_path_factory):
    """(model, tokenizer, image processor, family) of one tiny model in fp32."""
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "mllama":  # a text layer after the cross-attention one, as in Llama 3.2
        tiny_mllama(folder, cross_attention_layers=(0,))
    else:
        BUILDERS[request.param](folder)
    model, tokenizer, images = load_vision_model(folder)
    if request.param == "mllama":
        # transformers starts mllama's cross-attention gates at 0 (a checkpoint sets them):
        # left so, images would never reach the text and no row could differ from itself alone.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                    p.fill_(0.7)
    return model, tokenizer, images, vision_family(model.config)


def _encode(loaded, messages, images=()):
    _, tokenizer, processor, family = loaded
    return encode_vision(messages, list(images), tokenizer, processor, family)


def _row_losses(model, batch) -> list[torch.Tensor]:
    """The mean next-token loss of each row of a collated batch, from one forward."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    return [F.cross_entropy(logits[r][targets[r] != IGNORE], targets[r][targets[r] != IGNORE])
            for r in range(len(targets))]


def _pad_id(tokenizer):
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@pytest.mark.parametrize("order", ["text_first", "image_first", "text_between"])
def test_text_rows_in_an_image_batch_keep_their_own_loss(loaded, order):
    """Text-only rows (longer and shorter than the image rows) padded with rows of one and two
    images: no row gets a blank image, loses its images to another row or sees another's."""
    if loaded[3].model_type not in TOKEN_FAMILIES:
        pytest.skip("mllama: see test_mllama_rows_share_a_batch_only_with_as_many_images")
    model, tokenizer = loaded[:2]
    text, short, one, two = (_encode(loaded, TEXT), _encode(loaded, SHORT_TEXT),
                             _encode(loaded, *ONE), _encode(loaded, *TWO))
    assert not text.image_inputs and one.image_inputs
    rows = {"text_first": [text, two, short, one], "image_first": [one, text, two, short],
            "text_between": [two, text, short, one]}[order]
    batch = collate_images([[ex] for ex in rows], _pad_id(tokenizer))
    with torch.no_grad():
        together = _row_losses(model, batch)
        for r, ex in enumerate(rows):
            torch.testing.assert_close(together[r], vision_loss(model, ex), rtol=1e-5, atol=1e-5,
                                       msg=f"row {r} ({order})")


def test_a_batch_of_text_rows_only(loaded):
    """Image data whose batch happens to hold no image: plain padded rows, each its own loss."""
    model, tokenizer = loaded[:2]
    rows = [_encode(loaded, TEXT), _encode(loaded, SHORT_TEXT)]
    batch = collate_images([[ex] for ex in rows], _pad_id(tokenizer))
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    with torch.no_grad():
        for r, loss in enumerate(_row_losses(model, batch)):
            torch.testing.assert_close(loss, vision_loss(model, rows[r]), rtol=1e-5, atol=1e-5)


def test_training_batches_of_mixed_data(loaded):
    """`loratune train`'s batches of an image data set with text-only rows: every row once an
    epoch, each with its own loss, deterministic in the seed."""
    model, tokenizer = loaded[:2]
    examples = [_encode(loaded, TEXT), _encode(loaded, *ONE), _encode(loaded, SHORT_TEXT),
                _encode(loaded, *TWO), _encode(loaded, TEXT)]
    made = batches(examples, batch_size=2, max_length=4096, packing=False,
                   pad_id=_pad_id(tokenizer), seed=3, epoch=0)
    again = batches(examples, batch_size=2, max_length=4096, packing=False,
                    pad_id=_pad_id(tokenizer), seed=3, epoch=0)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(made, again))
    seen = []
    with torch.no_grad():
        for batch in made:
            for r, loss in enumerate(_row_losses(model, batch)):
                ids = batch["input_ids"][r][batch["attention_mask"][r].bool()].tolist()
                ex = next(e for e in examples if e.input_ids == ids)
                torch.testing.assert_close(loss, vision_loss(model, ex), rtol=1e-5, atol=1e-5)
                seen.append(ids)
    assert sorted(map(tuple, seen)) == sorted(tuple(e.input_ids) for e in examples)


def test_mllama_rows_share_a_batch_only_with_as_many_images(loaded):
    """mllama: collate_images pads a mixed batch as MllamaImageProcessor pads one (blank
    images, tile 0 of their aspect_ratio_mask set); still, a token that sees no image attends
    evenly to its row's padding images, so a text-only row (and a row of fewer images) loses
    its own loss in such a batch: image_batches never makes one."""
    if loaded[3].model_type != "mllama":
        pytest.skip("a cross-attention family only")
    model, tokenizer, processor, _ = loaded
    text, one, two = _encode(loaded, TEXT), _encode(loaded, *ONE), _encode(loaded, *TWO)
    for rows, images in (([one, text], [ONE[1], []]), ([two, one], [TWO[1], ONE[1]])):
        batch = collate_images([[ex] for ex in rows], _pad_id(tokenizer))
        want = processor(images=images, return_tensors="pt")
        for key in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
            torch.testing.assert_close(batch[key], want[key], rtol=0, atol=0, msg=key)
        with torch.no_grad():
            fewer = _row_losses(model, batch)[1]  # the row of fewer images
        assert abs(float(fewer - vision_loss(model, rows[1]))) > 1e-3  # why they are grouped
    rows = [[ex] for ex in (text, one, two, _encode(loaded, SHORT_TEXT), one, text)]
    counts = [[(r[0].image_inputs.get("cross_attention_mask", torch.zeros(1, 1, 0))).shape[2]
               for r in group] for group in image_batches(rows, 2)]
    assert counts == [[0, 0], [1, 1], [2], [0]]  # leftovers in the order of their first row
