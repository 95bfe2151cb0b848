"""A chat request's image parts: read, checked and encoded as the model's family encodes them.

OpenAI's `{"type": "image_url", "image_url": {"url": ...}}` parts name an image three ways:
- a `data:image/...;base64,` URL (the image in the request);
- a path, read only under the server's `--image-root` (resolved, links included: a path or a
  link that leads outside is refused), and refused when no root was given;
- an http(s) URL, fetched only with `--allow-remote-images` (at most `max_bytes`).
Each is read by data/images.py (the training data's reader: the same pixel limit checked from
the header before decoding, the same errors) and every error names the part
(`messages[i].content[j]`) and what was expected.

The prompt is what training saw before an answer: models/vision.encode_vision's encoding of
the conversation with an empty assistant turn, cut before that turn's first labelled token (the
chat template's generation prompt); so each image is widened exactly as in training (Qwen2-VL's
merged patches, Idefics3's tiles) and the family's pixel inputs come with it.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import os
import re
import socket
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from loratune.data.errors import DataError
from loratune.data.images import DEFAULT_MAX_PIXELS, ImageRules, read_image
from loratune.models.vision import encode_vision, last_answer_start, prompt_image_inputs

_HTTP = re.compile(r"^https?://", re.IGNORECASE)
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
_DATA_IMAGE = re.compile(r"^data:image/[^;,]+;base64,", re.IGNORECASE)


@dataclass(frozen=True)
class ImageSource:
    """Where a server may read images from, and how large they may be."""

    root: Path | None = None        # --image-root; None: image paths are refused
    allow_remote: bool = False      # --allow-remote-images
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = 20 * 2**20     # a fetched image's largest size
    fetch_timeout_s: float = 10.0

    def rules(self) -> ImageRules:
        return ImageRules(max_pixels=self.max_pixels)


class ImageError(ValueError):
    """A request's image part that cannot be used; `field` names the part."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass
class ImagePrompt:
    """A prompt with images: its token ids (each image widened) and the family's inputs."""

    ids: list[int]
    images: int
    inputs: dict


def read_part_image(url: str, field: str, source: ImageSource):
    """The RGB image a part's url names, checked as training data's images are."""
    if _DATA_IMAGE.match(url):
        ref = url
    elif _HTTP.match(url):
        ref = fetch(url, field, source)
    elif _SCHEME.match(url) and not url.lower().startswith("file:"):
        raise ImageError(field, f"{field}.image_url.url: {url.split(',')[0][:40]!r} is not "
                         "read; expected a data:image/...;base64 URL, a path under "
                         "--image-root or (with --allow-remote-images) an http(s) URL")
    else:
        real = confined(url.removeprefix("file://"), field, source.root)
        with opened_under(real, field, source.root) as ref:
            try:
                return decoded(ref, field, source)
            except ImageError as err:  # named by its path, not /proc/self/fd/N
                raise ImageError(field, str(err).replace(ref, str(real))) from None
    return decoded(ref, field, source)


def decoded(ref: str, field: str, source: ImageSource):
    try:
        return read_image(ref, field, "request", source.rules())
    except DataError as err:
        raise ImageError(field, str(err)) from None


@contextlib.contextmanager
def opened_under(real: Path, field: str, root: Path):
    """The name to read `real` by once it is open: /proc/self/fd/N, the opened file itself, so
    a link swapped in after confined() resolved the path cannot lead outside (nor a FIFO block
    the worker). Opened without following a last link and without blocking, then checked: a
    regular file, really under the root. Without /proc, the resolved path."""
    if not Path("/proc/self/fd").is_dir():
        yield str(real)
        return
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        yield str(real)         # read_image names it: image file not found
        return
    except OSError as err:
        raise ImageError(field, f"{field}.image_url.url: {real} cannot be opened ("
                         f"{err.strerror}: a link swapped in may lead outside --image-root); "
                         "expected an image file under it") from None
    try:
        name = f"/proc/self/fd/{fd}"
        opened = Path(os.path.realpath(name))
        if not opened.is_relative_to(os.path.realpath(root)):
            raise ImageError(field, f"{field}.image_url.url: {real} was opened as {opened}, "
                             "outside --image-root; expected a path under it")
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ImageError(field, f"{field}.image_url.url: {real} is not a regular file; "
                             "expected an image file")
        yield name
    finally:
        os.close(fd)


def confined(path: str, field: str, root: Path | None) -> Path:
    """`path` (relative to `root`, or absolute) resolved, links included; refused unless it
    lies under `root`."""
    if root is None:
        raise ImageError(field, f"{field}.image_url.url: image paths are read only under "
                         "--image-root, and this server has none; expected a data:image/..."
                         ";base64 URL")
    if "\0" in path:  # os.path.realpath raises ValueError on it: a 500, not the part's 400
        raise ImageError(field, f"{field}.image_url.url: the path has a NUL character; "
                         "expected a path under --image-root")
    base = Path(os.path.realpath(root))
    real = Path(os.path.realpath(base / Path(path).expanduser()))
    if not real.is_relative_to(base):
        raise ImageError(field, f"{field}.image_url.url: {path} resolves to {real}, outside "
                         f"--image-root {base}; expected a path under it")
    return real


def fetch(url: str, field: str, source: ImageSource) -> str:
    """An http(s) image as a data: URL (read by the same checks), at most max_bytes, within
    fetch_timeout_s in all, from a public address, redirects not followed: a user's URL must
    not make the server read its own network (cloud metadata at 169.254.169.254, localhost)."""
    where = f"{field}.image_url.url"
    if not source.allow_remote:
        raise ImageError(field, f"{where}: remote image URLs are not fetched by "
                         "this server (start it with --allow-remote-images); expected a "
                         "data:image/...;base64 URL or a path under --image-root")
    check_public(url, where, field)
    deadline = time.monotonic() + source.fetch_timeout_s
    data = bytearray()
    try:
        with open_url(url, source.fetch_timeout_s) as response:
            while len(data) <= source.max_bytes:
                if time.monotonic() > deadline:   # the socket timeout is per read: a drip
                    raise ImageError(field, f"{where}: fetching {url} took longer than "
                                     f"{source.fetch_timeout_s} s")
                chunk = response.read1(1 << 16)   # what has come, not a full 64 KiB
                if not chunk:
                    break
                data += chunk
    except (OSError, urllib.error.URLError) as err:
        raise ImageError(field, f"{where}: fetching {url} failed: {err}") from None
    if len(data) > source.max_bytes:
        raise ImageError(field, f"{where}: {url} is larger than "
                         f"{source.max_bytes} bytes; expected a smaller image")
    return "data:image/unknown;base64," + base64.b64encode(bytes(data)).decode("ascii")


def host_addresses(host: str) -> list[str]:
    """Every address `host` resolves to."""
    return [info[4][0] for info in socket.getaddrinfo(host, None)]


def check_public(url: str, where: str, field: str) -> None:
    """Refuse a URL whose host resolves to any non-public address (loopback, private, link-local,
    reserved). A name that resolves again differently at connect time (DNS rebinding) is not
    caught here: --allow-remote-images is for servers whose network has nothing to hide."""
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        addresses = host_addresses(host)
    except OSError as err:
        raise ImageError(field, f"{where}: {host!r} does not resolve ({err})") from None
    for address in addresses:
        if not ipaddress.ip_address(address.split("%")[0]).is_global:
            raise ImageError(field, f"{where}: {host!r} resolves to {address}, not a public "
                             "address; this server fetches images only from public addresses")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an error: it could lead to an address check_public did not see."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise urllib.error.HTTPError(req.full_url, code, f"redirect to {newurl} not followed",
                                     headers, fp)


def open_url(url: str, timeout: float):
    return urllib.request.build_opener(_NoRedirect).open(url, timeout=timeout)


def image_prompt(tokenizer, messages: list[dict], images: list,
                 template: str | None = None) -> ImagePrompt:
    """The generation prompt of `messages` (image parts as {"type": "image"}) with `images`
    encoded by the tokenizer's family encoder (models/load.py puts it on the tokenizer)."""
    encoder = tokenizer.image_encoder
    answer = [*messages, {"role": "assistant", "content": ""}]
    example = encode_vision(answer, images, tokenizer, encoder.image_processor, encoder.family,
                            max_length=1 << 30, template=template)
    cut = last_answer_start(answer, example.labels)   # not the first: history has answers
    if cut is None:
        raise DataError("the chat template wrote no assistant turn after the messages; "
                        "expected its generation prompt to end the prompt")
    return ImagePrompt(example.input_ids[:cut], len(images), prompt_image_inputs(example, cut))


def image_refs(messages: list[dict]) -> list[tuple[str, str]]:
    """(field, url) of every image_url part, in order: `messages[i].content[j]`."""
    return [(f"messages[{i}].content[{j}]", part["image_url"]["url"])
            for i, m in enumerate(messages) if isinstance(m.get("content"), list)
            for j, part in enumerate(m["content"]) if part.get("type") == "image_url"]


def vision_turns(messages: list[dict]) -> list[dict]:
    """The turns as VLM chat templates read them: a turn with images as text and image parts,
    one without as plain text (as data/images.py gives training's turns)."""
    turns = []
    for m in messages:
        content = m.get("content")
        role = "system" if m["role"] == "developer" else m["role"]
        if isinstance(content, list) and any(p["type"] == "image_url" for p in content):
            content = [{"type": "image"} if p["type"] == "image_url" else
                       {"type": "text", "text": p["text"]} for p in content]
        elif isinstance(content, list):
            content = "".join(p["text"] for p in content)
        turns.append({"role": role, "content": content or ""})
    return turns


def request_images(messages: list[dict], tokenizer, source: ImageSource, model: str,
                   template: str | None = None) -> ImagePrompt | None:
    """The prompt of a chat request with image parts (None: it has none); an ImageError names
    the part at fault: a text model's, or an image that cannot be read."""
    refs = image_refs(messages)
    if not refs:
        return None
    if getattr(tokenizer, "image_encoder", None) is None:
        raise ImageError(refs[0][0], f"{refs[0][0]}: model {model!r} is a text model; it takes "
                         "no image parts (serve a vision-language model folder for images)")
    images = read_images(refs, source)
    try:
        return image_prompt(tokenizer, vision_turns(messages), images, template)
    except DataError as err:
        raise ImageError("messages", f"messages: {err}") from None


def read_images(refs: list[tuple[str, str]], source: ImageSource) -> list:
    """The parts' images in order, their pixels together at most `max_pixels`: each image alone
    under the limit, many of them in one body (a 4096² PNG is 48 KB) were gigabytes decoded."""
    images, total = [], 0
    for field, url in refs:
        image = read_part_image(url, field, source)
        total += image.width * image.height
        if total > source.max_pixels:
            raise ImageError(field, f"{field}: the request's images come to {total} pixels "
                             f"with this one; expected at most {source.max_pixels} in all "
                             "(--image-max-pixels)")
        images.append(image)
    return images
