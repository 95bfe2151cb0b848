"""Conversations with images: image content parts and LLaMA-Factory's `images` column, read into
(messages, PIL images) for a vision-language processor.

A record gives its images one of two ways, not both:
- content parts in a turn: `{"type": "image", "image": "path"}`, or OpenAI's
  `{"type": "image_url", "image_url": {"url": "path or data:image/...;base64,..."}}`;
- LLaMA-Factory's layout: `<image>` markers in the text and an `images` column listing the files
  in marker order (messages or sharegpt turns).
Either way the result is the same: a turn with images has as content a list of
`{"type": "image"}` and `{"type": "text", "text": ...}` parts (what VLM chat templates render), a
turn without is plain text; and the images come in order.

Paths are relative to the data file's folder. Nothing is fetched from the network: a remote URL
is refused by name (`data.allow_remote_images`). The pixel count is read from the file's header
and checked before the pixels are decoded, so a decompression bomb is refused, not decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass
from pathlib import Path

from loratune.data.errors import DataError
from loratune.data.formats import ROLES, SHAREGPT_ROLES, locate

IMAGE_MARKER = "<image>"
DEFAULT_MAX_PIXELS = 4096 * 4096  # DataConfig.image_max_pixels' default
_REMOTE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_DATA_URL = re.compile(r"^data:image/[a-zA-Z0-9.+-]+;base64,", re.IGNORECASE)


@dataclass(frozen=True)
class ImageRules:
    """How images are read: the largest width*height accepted; remote URLs never fetched."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    allow_remote: bool = False


def image_rules(data) -> ImageRules:
    """The rules a `data:` config section sets (DataConfig.image_max_pixels, ...)."""
    return ImageRules(max_pixels=data.image_max_pixels, allow_remote=data.allow_remote_images)


@dataclass
class _Where:
    """Names a record in errors and resolves its relative paths."""

    record: str
    folder: Path


def vision_messages(record: dict, source: str | Path | None = None, index: int | None = None,
                    rules: ImageRules = ImageRules()) -> tuple[list[dict], list]:
    """(messages with content parts, PIL images in order) for one record; `source` is the data
    file (relative image paths are read from its folder), `index` its line or position."""
    where = _Where(locate(source, index), Path(source).parent if source else Path("."))
    key, role_key, text_key, roles = _layout(record, where.record)
    turns = record.get(key)
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where.record}: field '{key}' must be a non-empty list of turns")
    column = record.get("images")
    messages, refs = [], []
    for i, turn in enumerate(turns):
        field = f"{key}[{i}]"
        if not isinstance(turn, dict) or turn.get(role_key) not in roles:
            raise DataError(f"{where.record}: {field}.{role_key} is "
                            f"{turn.get(role_key) if isinstance(turn, dict) else turn!r}; "
                            f"expected one of {', '.join(roles)}")
        parts, turn_refs = _parts(turn.get(text_key), f"{field}.{text_key}", where.record)
        messages.append({"role": roles[turn[role_key]], "content": _plain(parts)})
        refs.extend(turn_refs)
    refs = _match_column(refs, column, where.record)
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where.record}: the conversation must end with an assistant turn, "
                        f"not '{messages[-1]['role']}'")
    return messages, [load_image(ref, field, where, rules) for field, ref in refs]


def _plain(parts: list[dict]) -> list[dict] | str:
    """A turn without images as plain text: answer-only labelling marks the end of an answer
    by appending to its text, and every VLM template renders a string content as is."""
    if any(p["type"] == "image" for p in parts):
        return parts
    return "".join(p["text"] for p in parts)


def _layout(record: dict, where: str) -> tuple[str, str, str, dict]:
    if "messages" in record:
        return "messages", "role", "content", {r: r for r in ROLES}
    if "conversations" in record:
        return "conversations", "from", "value", SHAREGPT_ROLES
    raise DataError(f"{where}: an image record needs 'messages' or 'conversations'; got keys "
                    f"{sorted(record)}")


def _parts(content, field: str, where: str) -> tuple[list[dict], list]:
    """(content parts, [(field, ref)] of its image parts; ref None for an `<image>` marker)."""
    if isinstance(content, str):
        return _marked_text(content, field)
    if not isinstance(content, list):
        raise DataError(f"{where}: field '{field}' must be text or a list of content parts, "
                        f"got {type(content).__name__}")
    parts, refs = [], []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            more, marks = _marked_text(part["text"], f"{field}[{j}].text")
            parts += more
            refs += marks
        elif kind in ("image", "image_url"):
            parts.append({"type": "image"})
            refs.append((f"{field}[{j}]", _part_ref(part, kind, f"{field}[{j}]", where)))
        else:
            raise DataError(f"{where}: {field}[{j}] must be a content part of type text, image "
                            f"or image_url, got {part!r:.80}")
    return parts, refs


def _part_ref(part: dict, kind: str, field: str, where: str) -> str:
    ref = part.get("image") if kind == "image" else (part.get("image_url") or {})
    if isinstance(ref, dict):  # image_url: {"url": ...}
        ref = ref.get("url")
    if not isinstance(ref, str) or not ref:
        key = "image" if kind == "image" else "image_url.url"
        raise DataError(f"{where}: {field}.{key} must be a path or data: URL")
    return ref


def _marked_text(text: str, field: str) -> tuple[list[dict], list]:
    """Text split at `<image>` markers: an image part where each marker stood."""
    parts, refs = [], []
    for k, piece in enumerate(text.split(IMAGE_MARKER)):
        if k:
            parts.append({"type": "image"})
            refs.append((field, None))
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts, refs


def _match_column(refs: list, column, where: str) -> list[tuple[str, str]]:
    """The image references in order: parts name their own; markers take the `images` column."""
    markers = sum(ref is None for _, ref in refs)
    if column is None or column == []:
        if markers:
            raise DataError(f"{where}: {markers} {IMAGE_MARKER} marker(s) but no 'images' "
                            "column; expected one image per marker")
        return refs
    if not isinstance(column, list) or not all(isinstance(c, str) for c in column):
        raise DataError(f"{where}: field 'images' must be a list of paths")
    if markers != len(refs):
        raise DataError(f"{where}: image content parts and an 'images' column together; "
                        "expected one or the other")
    if markers != len(column):
        more = "images than markers" if len(column) > markers else "markers than images"
        raise DataError(f"{where}: more {more}: {len(column)} in 'images', {markers} "
                        f"{IMAGE_MARKER} marker(s) in the text; expected one image per marker")
    return [(f"images[{n}]", ref) for n, ref in enumerate(column)]


def load_image(ref: str, field: str, where: _Where, rules: ImageRules):
    """The RGB image `ref` names (a path or a data: URL), checked before it is decoded."""
    from PIL import Image, UnidentifiedImageError

    name = f"{where.record}: {field} ({_short(ref)})"
    if _DATA_URL.match(ref):
        try:
            source = io.BytesIO(base64.b64decode(ref.split(",", 1)[1], validate=True))
        except (binascii.Error, ValueError):
            raise DataError(f"{name}: the data: URL is not valid base64") from None
    elif _REMOTE.match(ref) or ref.startswith("data:"):
        raise DataError(f"{name}: remote image URLs are not fetched (data.allow_remote_images "
                        "is off); expected a local path or a data:image/...;base64 URL")
    else:
        source = where.folder / ref
        if not source.is_file():
            raise DataError(f"{name}: image file not found: {source}")
    try:
        image = Image.open(source)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise DataError(f"{name}: not a readable image ({type(err).__name__})") from None
    if image.width * image.height > rules.max_pixels:
        raise DataError(f"{name}: {image.width}x{image.height} is too large; expected at most "
                        f"{rules.max_pixels} pixels (data.image_max_pixels)")
    try:
        return image.convert("RGB")
    except (OSError, ValueError) as err:  # a header that parses over truncated pixel data
        raise DataError(f"{name}: not a readable image ({err})") from None


def read_image(ref: str, field: str, record: str, rules: ImageRules,
               folder: Path = Path(".")):
    """One image as load_image reads it (a path under `folder` or a data: URL, same checks),
    errors naming `record: field` (serve/image_prompt.py: a request's content part)."""
    return load_image(ref, field, _Where(record, folder), rules)


def _short(ref: str) -> str:
    return ref if len(ref) <= 60 else ref[:40] + "..."
