"""`loratune serve`'s image parts against hostile requests (issue 29): each is one 400 naming
the part, read before the server spends memory on it, and the server answers the next request."""

import base64
import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from vision_models import tiny_qwen2_5_vl

from loratune.config import ModelConfig
from loratune.models import load_model
from loratune.serve.api import build_app
from loratune.serve.engine import Engine
from loratune.serve.image_prompt import ImageSource
from loratune.serve.pool import AdapterPool

LOCAL = "http://127.0.0.1:8000"
MAX_PIXELS = 64 * 64


def png(size, colour=(200, 20, 20)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


def data_url(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    (folder / "ok.png").write_bytes(png((20, 20)))
    return folder


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    model, tok = load_model(ModelConfig(name=str(tiny_qwen2_5_vl(tmp_path_factory.mktemp("q")))))
    return model, tok, tmp_path_factory.mktemp("adapters")


def engine_on(qwen, **kw):
    model, tok, adapters = qwen
    return Engine(model, tok, AdapterPool(adapters, max_adapters=2), base_name="vlm",
                  max_completion_tokens=4, **kw).start()


@pytest.fixture(scope="module")
def client(qwen, root):
    engine = engine_on(qwen)
    app = build_app(engine, images=ImageSource(root=root, max_pixels=MAX_PIXELS))
    with TestClient(app, base_url=LOCAL, raise_server_exceptions=False) as c:
        yield c
    engine.stop()


def ask(client, urls):
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return client.post("/v1/chat/completions", json={
        "model": "vlm", "max_tokens": 2, "temperature": 0,
        "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "hi"}]}]})


def refused(resp, field, words):
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == field and words in error["message"], error


def test_a_nul_in_a_path_is_400_not_a_server_error(client):
    """os.path.realpath raised ValueError (embedded null byte): a 500 "internal error"."""
    refused(ask(client, ["ok.png\x00.txt"]), "messages[0].content[0]", "NUL")
    assert ask(client, ["ok.png"]).status_code == 200


def test_the_pixel_limit_counts_a_requests_images_together(client):
    """Each image under --image-max-pixels, but many in one body: 64 PNGs of 4096² (48 KB
    each, 4 MB together) were decoded whole, 7 GB of memory and a minute for one request.
    The limit is the request's: the image that takes it past is refused by name."""
    side = int(MAX_PIXELS ** 0.5)
    urls = [data_url(png((side, side // 2)))] * 2     # exactly the limit: served
    assert ask(client, urls).status_code == 200
    refused(ask(client, urls + [data_url(png((2, 1)))]), "messages[0].content[2]",
            f"the request's images come to {MAX_PIXELS + 2} pixels with this one; expected at "
            f"most {MAX_PIXELS} in all (--image-max-pixels)")


@pytest.mark.parametrize("swapped", ["the file", "its folder"])
def test_a_link_swapped_in_after_the_check_does_not_lead_outside(client, root, tmp_path,
                                                                 monkeypatch, swapped):
    """A symlink race: the path resolves under the root, then (before it is opened) the file,
    or a folder on its way, is replaced by a link to one outside. The open file itself must be
    under the root: the outside picture was read and answered (200)."""
    import loratune.serve.image_prompt as image_prompt_module

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "swap.png").write_bytes(png((20, 20), (1, 2, 3)))
    (root / swapped[:3]).mkdir()
    (root / swapped[:3] / "swap.png").write_bytes(png((20, 20)))
    checked = image_prompt_module.confined

    def then_swap(path, field, base):
        real = checked(path, field, base)
        moved = real if swapped == "the file" else real.parent
        moved.rename(tmp_path / "away")
        moved.symlink_to(outside / "swap.png" if swapped == "the file" else outside)
        return real

    monkeypatch.setattr(image_prompt_module, "confined", then_swap)
    refused(ask(client, [f"{swapped[:3]}/swap.png"]), "messages[0].content[0]",
            "outside --image-root")


def test_more_images_than_prompt_tokens_are_refused_before_decoding(qwen, monkeypatch):
    """Each image is one prompt token at least: a 4 MB body of 1x1 PNGs (25,000 parts) was
    decoded and encoded whole (8,000 took 9 s) before the token budget refused it."""
    import loratune.serve.image_prompt as image_prompt_module

    def never(*args):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(image_prompt_module, "read_part_image", never)
    engine = engine_on(qwen, max_prompt_tokens=8)
    with TestClient(build_app(engine), base_url=LOCAL) as c:
        resp = ask(c, [data_url(png((1, 1)))] * 9)
    engine.stop()
    refused(resp, "messages", "9 image parts; this server takes at most 8 prompt tokens "
            "(--max-prompt-tokens), and each image is one at least")


def test_an_image_row_cancelled_mid_decode_leaves_no_trace(tmp_path_factory):
    """A client that leaves after its image row's prefill: its row is dropped between decode
    steps while another image row runs on; the rows that join afterwards (text, and an image
    row on the freed place) each equal generate(), so no features or cache of the cancelled
    row reach them, and its adapter is unpinned."""
    from test_serve_images import engine_on as vlm_engine
    from test_serve_images import run_out, served, submit

    vlm = served(tmp_path_factory, "qwen2_5_vl")
    _, _, _, cases, refs = vlm
    engine = vlm_engine(vlm)
    left, stays = submit(engine, cases[0], "vis"), submit(engine, cases[2], "vis")
    engine.step()
    engine.step()
    left.cancel()
    engine.step()
    text, image = submit(engine, cases[3], "lang"), submit(engine, cases[1], "lang")
    results = run_out(engine, [stays, text, image])
    gone = left.result()
    assert gone.finish_reason == "cancelled" and len(gone.token_ids) < 8
    assert [r.token_ids for r in results] == [refs[(2, "vis")], refs[(3, "lang")],
                                             refs[(1, "lang")]]
    assert engine.pool.pins == {} and not engine.running


# -- remote images (--allow-remote-images): the server's own network stays out of reach ----------
@pytest.fixture
def http_server():
    """A local server: /ok an image, /redirect to the cloud metadata address, /drip one byte
    every 0.2 s (each read within a per-read timeout, the whole far past any deadline)."""
    import http.server
    import threading
    import time

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
                self.end_headers()
                return
            self.send_response(200)
            self.end_headers()
            if self.path == "/ok":
                self.wfile.write(png((8, 8)))
                return
            for _ in range(40):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.2)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/x.png", "http://169.254.169.254/latest/",
                                 "http://10.0.0.1/x.png", "http://[::1]/x.png"])
def test_remote_urls_to_the_servers_own_network_are_refused(url):
    from loratune.serve.image_prompt import ImageError, fetch

    with pytest.raises(ImageError, match=r"messages\[0\]\.content\[0\]\.image_url\.url: .* "
                                         r"not a public address"):
        fetch(url, "messages[0].content[0]", ImageSource(allow_remote=True))


def test_a_redirect_is_not_followed_and_a_drip_meets_the_deadline(http_server, monkeypatch):
    """The check sees the URL's host only: a redirect (here to 169.254.169.254) would lead past
    it, so none is followed; a server sending a byte per 0.2 s meets the total deadline, not a
    per-read timeout it never trips."""
    import time

    import loratune.serve.image_prompt as image_prompt
    from loratune.serve.image_prompt import ImageError, fetch

    monkeypatch.setattr(image_prompt, "host_addresses", lambda host: ["93.184.215.14"])
    source = ImageSource(allow_remote=True, fetch_timeout_s=1.0)
    assert fetch(f"{http_server}/ok", "p", source).startswith("data:image/unknown;base64,")
    with pytest.raises(ImageError, match="redirect to http://169.254.169.254/.* not followed"):
        fetch(f"{http_server}/redirect", "p", source)
    start = time.monotonic()
    with pytest.raises(ImageError, match=r"took longer than 1.0 s"):
        fetch(f"{http_server}/drip", "p", source)
    assert time.monotonic() - start < 3
