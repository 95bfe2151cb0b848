"""Image records: content parts, OpenAI image_url, LLaMA-Factory's images column; each error names
file, line and image."""

import base64
import io
import json

import pytest
from PIL import Image

from loratune.data import DataError, to_messages
from loratune.data.images import ImageRules, vision_messages


def _png(path, size=(4, 3), color=(255, 0, 0)):
    Image.new("RGB", size, color).save(path)
    return path


def _data_url(size=(2, 2), color=(0, 0, 255)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _answer(text="red"):
    return {"role": "assistant", "content": text}


def test_image_part_path_relative_to_data_file(tmp_path):
    (tmp_path / "img").mkdir()
    _png(tmp_path / "img" / "a.png", (4, 3), (255, 0, 0))
    record = {"messages": [{"role": "user", "content": [
        {"type": "image", "image": "img/a.png"}, {"type": "text", "text": "Colour?"}]}, _answer()]}
    messages, images = vision_messages(record, tmp_path / "d.jsonl", 1)
    assert messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "Colour?"}]
    assert messages[1]["content"] == "red"  # no image: plain text, as text templates expect
    assert [im.size for im in images] == [(4, 3)]
    assert images[0].getpixel((0, 0)) == (255, 0, 0)


def test_openai_image_url_path_and_data_url_multi_turn(tmp_path):
    _png(tmp_path / "b.png", (5, 5), (0, 255, 0))
    record = {"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "b.png"}},
                                     {"type": "image_url", "image_url": {"url": _data_url()}},
                                     {"type": "text", "text": "Both?"}]},
        _answer("green, blue"),
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(
            (3, 1), (9, 9, 9))}}]},
        _answer("grey")]}
    messages, images = vision_messages(record, tmp_path / "d.jsonl", 2)
    assert [p["type"] for p in messages[0]["content"]] == ["image", "image", "text"]
    assert [im.getpixel((0, 0)) for im in images] == [(0, 255, 0), (0, 0, 255), (9, 9, 9)]
    assert images[2].size == (3, 1)


def test_llamafactory_images_column_and_markers(tmp_path):
    _png(tmp_path / "1.png", color=(1, 1, 1))
    _png(tmp_path / "2.png", color=(2, 2, 2))
    record = {"conversations": [{"from": "human", "value": "<image>left, <image>right: same?"},
                                {"from": "gpt", "value": "no"}],
              "images": ["1.png", "2.png"]}
    messages, images = vision_messages(record, tmp_path / "d.json", 0)
    assert messages[0] == {"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "left, "}, {"type": "image"},
        {"type": "text", "text": "right: same?"}]}
    assert [im.getpixel((0, 0)) for im in images] == [(1, 1, 1), (2, 2, 2)]


def test_missing_image_names_file_line_and_image(tmp_path):
    record = {"messages": [{"role": "user", "content": [{"type": "image", "image": "gone.png"}]},
                           _answer()]}
    with pytest.raises(DataError, match=r"d\.jsonl:7: messages\[0\]\.content\[0\] \(gone\.png\)"
                       r": image file not found"):
        vision_messages(record, tmp_path / "d.jsonl", 7)


def test_unreadable_image_is_named(tmp_path):
    (tmp_path / "notes.png").write_text("not a picture")
    record = {"messages": [{"role": "user", "content": "<image>?"}, _answer()],
              "images": ["notes.png"]}
    with pytest.raises(DataError, match=r"d\.jsonl:3: images\[0\] \(notes\.png\): not a "
                       r"readable image"):
        vision_messages(record, tmp_path / "d.jsonl", 3)


def test_bad_base64_data_url_is_named(tmp_path):
    record = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}, _answer()]}
    with pytest.raises(DataError, match=r"d\.jsonl:4: .*not valid base64"):
        vision_messages(record, tmp_path / "d.jsonl", 4)


def test_too_large_image_refused_before_decoding(tmp_path):
    _png(tmp_path / "big.png", (40, 30))
    record = {"messages": [{"role": "user", "content": [{"type": "image", "image": "big.png"}]},
                           _answer()]}
    with pytest.raises(DataError, match=r"d\.jsonl:5: .*\(big\.png\): 40x30 is too large; "
                       r"expected at most 1000 pixels \(data\.image_max_pixels\)"):
        vision_messages(record, tmp_path / "d.jsonl", 5, ImageRules(max_pixels=1000))
    assert len(vision_messages(record, tmp_path / "d.jsonl", 5, ImageRules(1200))[1]) == 1


@pytest.mark.parametrize("url", ["https://example.com/cat.png", "http://x/y.jpg",
                                 "ftp://host/a.png", "data:text/plain,hi"])
def test_remote_urls_refused_by_name(tmp_path, url):
    record = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}]}, _answer()]}
    with pytest.raises(DataError, match=r"d\.jsonl:2: .*remote image URLs are not fetched "
                       r"\(data\.allow_remote_images is off\)"):
        vision_messages(record, tmp_path / "d.jsonl", 2)


def test_more_images_than_markers(tmp_path):
    record = {"messages": [{"role": "user", "content": "<image> what?"}, _answer()],
              "images": ["a.png", "b.png"]}
    with pytest.raises(DataError, match=r"d\.jsonl:9: more images than markers: 2 in 'images', "
                       r"1 <image> marker"):
        vision_messages(record, tmp_path / "d.jsonl", 9)


def test_more_markers_than_images(tmp_path):
    record = {"messages": [{"role": "user", "content": "<image><image> what?"}, _answer()],
              "images": ["a.png"]}
    with pytest.raises(DataError, match=r"d\.jsonl:9: more markers than images: 1 in 'images', "
                       r"2 <image> marker"):
        vision_messages(record, tmp_path / "d.jsonl", 9)
    record.pop("images")
    with pytest.raises(DataError, match=r"d\.jsonl:9: 2 <image> marker\(s\) but no 'images'"):
        vision_messages(record, tmp_path / "d.jsonl", 9)


def test_parts_and_column_together_refused(tmp_path):
    record = {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"}]},
                           _answer()], "images": ["a.png"]}
    with pytest.raises(DataError, match="content parts and an 'images' column together"):
        vision_messages(record, tmp_path / "d.jsonl", 1)


def test_text_path_names_image_parts(tmp_path):
    """The text reader says an image part needs a vision model, not 'must be text'."""
    record = {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"}]},
                           _answer()]}
    with pytest.raises(DataError, match=r"d\.jsonl:3: field 'messages\[0\]\.content' holds an "
                       r"image part; .*vision"):
        to_messages(record, "auto", 3, tmp_path / "d.jsonl")


def test_jsonl_file_round_trip(tmp_path):
    """Records read from a file resolve images beside it, line numbers intact."""
    from loratune.data import iter_indexed

    _png(tmp_path / "a.png")
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + json.dumps({"messages": [{"role": "user", "content": "<image>?"},
                                                    _answer()], "images": ["a.png"]}) + "\n")
    [(n, record)] = list(iter_indexed(path))
    assert n == 2 and len(vision_messages(record, path, n)[1]) == 1


def test_config_fields_set_the_rules(tmp_path):
    """data.image_max_pixels reaches the check; data.allow_remote_images: true is refused by name
    (not supported yet)."""
    from pydantic import ValidationError

    from loratune.config.run import DataConfig
    from loratune.data.images import image_rules

    _png(tmp_path / "big.png", (40, 30))
    record = {"messages": [{"role": "user", "content": [{"type": "image", "image": "big.png"}]},
                           _answer()]}
    rules = image_rules(DataConfig(image_max_pixels=1000))
    with pytest.raises(DataError, match="40x30 is too large"):
        vision_messages(record, tmp_path / "d.jsonl", 1, rules)
    assert image_rules(DataConfig()).max_pixels == 4096 * 4096
    with pytest.raises(ValidationError, match="allow_remote_images"):
        DataConfig(allow_remote_images=True)
