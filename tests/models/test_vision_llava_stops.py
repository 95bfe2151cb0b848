"""LLaVA-1.5's template ends an answer with a space and no end-of-turn token; training labels a
stop (eos) after every answer of a multi-turn conversation, as LLaVA's own training does, not
after the last one only. LLaVA-NeXT's template writes </s> itself: nothing is added."""

import pytest
from PIL import Image
from vision_models import tiny_llava, tiny_llava_next

from loratune.data.encode import IGNORE
from loratune.models.vision import encode_vision, load_vision_model, vision_family

IMAGE = Image.new("RGB", (28, 28), (255, 0, 0))
TURNS = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare"}]},
         {"role": "assistant", "content": "red, blue"},
         {"role": "user", "content": "Which is first?"},
         {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
         {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "yes"}]


@pytest.fixture(scope="module", params=["llava", "llava_next"])
def loaded(request, tmp_path_factory):
    build = {"llava": tiny_llava, "llava_next": tiny_llava_next}[request.param]
    model, tokenizer, images = load_vision_model(build(tmp_path_factory.mktemp(request.param)))
    return tokenizer, images, vision_family(model.config)


def _runs(ex):
    """The labelled runs of an example: (first index, token ids)."""
    runs, start = [], None
    for i, label in enumerate(ex.labels + [IGNORE]):
        if label != IGNORE and start is None:
            start = i
        elif label == IGNORE and start is not None:
            runs.append((start, ex.input_ids[start:i]))
            start = None
    return runs


def test_every_answer_ends_with_a_labelled_stop(loaded):
    tokenizer, images, family = loaded
    before = repr(TURNS)
    ex = encode_vision(TURNS, [IMAGE], tokenizer, images, family)
    assert repr(TURNS) == before  # the caller's messages are not changed
    eos = tokenizer.eos_token_id
    answers = [r for _, r in _runs(ex) if r != [eos]]
    assert [tokenizer.decode(r, skip_special_tokens=True).strip() for r in answers] == \
        ["red, blue", "red", "yes"]
    labelled_stops = [i for i, (t, label) in enumerate(zip(ex.input_ids, ex.labels))
                      if t == eos and label == eos]
    assert len(labelled_stops) == 3, tokenizer.convert_ids_to_tokens(ex.input_ids)
    assert all(r[-1] == eos for r in answers[:2])  # right after the answer, with it
    assert ex.input_ids.count(eos) == 3  # never doubled where the template writes one


def test_a_single_answer_is_unchanged(loaded):
    """One turn: the only stop is the one the encoder always labels at the end."""
    tokenizer, images, family = loaded
    ex = encode_vision(TURNS[:2], [IMAGE], tokenizer, images, family)
    stops = [i for i, t in enumerate(ex.input_ids) if t == tokenizer.eos_token_id]
    assert len(stops) == 1 and ex.labels[stops[0]] == tokenizer.eos_token_id
