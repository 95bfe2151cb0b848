"""No web page drives or reads the server (issue 23, item 3, serve side): the Host must name
this server, a state-changing request from a foreign Origin or with a non-JSON body is
refused, and every refusal has OpenAI's error shape. Bodies no check foresaw are 400s.
"""

import json

import pytest
from fastapi.testclient import TestClient

from loratune.cli import build_parser
from loratune.config.commands import ServeConfig
from loratune.flags import config_from_args
from loratune.serve.api import build_app
from loratune.serve.engine import Engine
from loratune.serve.pool import AdapterPool
from test_serve_api import JSON, _save_lora, assert_error
from tiny import tiny_llama

BASE = "tiny-base"
GOOD = {"model": BASE, "prompt": "hi", "max_tokens": 2, "temperature": 0}
PATH, BODY = "/v1/completions", GOOD
STATE_CHANGING = [("/v1/completions", GOOD),
                  ("/v1/chat/completions", {"model": BASE, "max_tokens": 2,
                                            "messages": [{"role": "user", "content": "hi"}]}),
                  ("/v1/adapters/load", {"name": "a1"}),
                  ("/v1/adapters/unload", {"name": "a1"})]


@pytest.fixture(scope="module")
def engine(tmp_path_factory, smol_tokenizer):
    root = tmp_path_factory.mktemp("adapters")
    _save_lora(smol_tokenizer, root / "a1", "a1", 1)
    eng = Engine(tiny_llama(vocab=len(smol_tokenizer)), smol_tokenizer, AdapterPool(root),
                 base_name=BASE, max_completion_tokens=8).start()
    yield eng
    eng.stop()


def client(engine, at="127.0.0.1:8000", **app_kw) -> TestClient:
    """A client sending `Host: at` to the app build_app(engine, **app_kw) makes."""
    # Host as a header, not in base_url: starlette's TestClient (1.3) cannot parse "[::1]:8000".
    return TestClient(build_app(engine, **app_kw), headers={"Host": at},
                      raise_server_exceptions=False)


def served(engine) -> int:
    return engine.stats()["requests"]


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:8000", "10.0.0.7"])
def test_a_foreign_host_is_refused_before_anything_runs(engine, host):
    """DNS rebinding: a page's own name resolving to 127.0.0.1 reads nothing, drives nothing."""
    c = client(engine, at=host)
    before = served(engine)
    for path, body in STATE_CHANGING:
        err = assert_error(c.post(path, json=body), 421, "host_not_allowed")
        assert "--allowed-host" in err["message"], err
    for path in ["/v1/models", "/health", "/metrics"]:
        assert_error(c.get(path), 421, "host_not_allowed")
    assert served(engine) == before


def test_loopback_hosts_and_allowed_hosts_answer(engine):
    for host in ["127.0.0.1:8000", "localhost:8000", "[::1]:8000"]:
        assert client(engine, at=host).post(PATH, json=BODY).status_code == 200, host
    named = client(engine, at="box.lan:8000", allowed_hosts=["box.lan"])
    assert named.post(PATH, json=BODY).status_code == 200
    assert named.get("/v1/models").status_code == 200


@pytest.mark.parametrize("origin", ["http://evil.com", "null", "http://127.0.0.1:9999",
                                    "http://localhost:8000"])
def test_a_foreign_origin_is_refused_on_generate_and_adapter_calls(engine, origin):
    c = client(engine)
    before = served(engine)
    for path, body in STATE_CHANGING:
        err = assert_error(c.post(path, json=body, headers={"origin": origin}), 403,
                           "cross_origin_refused")
        assert err["type"] == "permission_error"
    assert served(engine) == before


def test_same_origin_passes(engine):
    resp = client(engine).post(PATH, json=BODY, headers={"origin": "http://127.0.0.1:8000"})
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("ctype", [None, "text/plain", "application/x-www-form-urlencoded",
                                   "multipart/form-data; boundary=x"])
def test_a_body_must_say_it_is_json(engine, ctype):
    """What a page can send cross-origin without asking first ("simple" requests)."""
    c = client(engine)
    headers = {} if ctype is None else {"content-type": ctype}
    before = served(engine)
    for path, body in STATE_CHANGING:
        raw = json.dumps(body).encode()
        err = assert_error(c.post(path, content=raw, headers=headers), 415,
                           "unsupported_content_type")
        assert "application/json" in err["message"]
    assert served(engine) == before


@pytest.mark.parametrize("raw, words", [
    (b"[1, 2]", "JSON object, got list"),
    (b'"text"', "JSON object, got str"),
    (b"null", "JSON object, got null"),
    (b"not json", "not valid JSON"),
    (b"\xff\xfe{}", "not valid JSON"),
    (b"[" * 100_000, "too deeply"),
    (b'{"model": "tiny-base", "prompt": "\\ud800", "max_tokens": 2}', "prompt: not Unicode"),
    (b'{"model": "tiny-base", "messages": [{"role": "user", "content": "a\\udfff"}]}',
     "messages.0.content: not Unicode"),
])
def test_bodies_no_check_foresaw_are_400(engine, raw, words):
    c = client(engine)
    for path, _ in STATE_CHANGING:
        if "messages" in raw.decode("latin-1") and path != "/v1/chat/completions":
            continue
        err = assert_error(c.post(path, content=raw, headers=JSON), 400)
        assert words in err["message"], (path, err)


def test_wildcard_bind_answers_any_host_only_with_a_key(engine):
    """Bound to 0.0.0.0 the server cannot know its names: with a key (which no page has) it
    answers any Host; without one (--insecure-no-key) loopback names only."""
    keyed = client(engine, at="10.0.0.7:8000", host="0.0.0.0", api_key="k")
    ok = keyed.post(PATH, json=BODY, headers={"authorization": "Bearer k"})
    assert ok.status_code == 200, ok.text
    keyless = client(engine, at="10.0.0.7:8000", host="0.0.0.0")
    assert_error(keyless.post(PATH, json=BODY), 421, "host_not_allowed")
    assert client(engine, host="0.0.0.0").post(PATH, json=BODY).status_code == 200


def test_serve_command_passes_its_host_and_allowed_hosts(monkeypatch, smol_tokenizer):
    """`loratune serve --host H --allowed-host N` builds the app with that policy."""
    import uvicorn

    from loratune import models
    from loratune.serve import api

    argv = ["serve", "--host", "192.168.1.5", "--api-key", "k", "--allowed-host", "box.lan",
            "--allowed-host", "proxy.example"]
    cfg = config_from_args(ServeConfig, build_parser().parse_args(argv))
    assert cfg.allowed_host == ["box.lan", "proxy.example"]
    apps = []
    monkeypatch.setattr(models, "load_model",
                        lambda _: (tiny_llama(vocab=len(smol_tokenizer)), smol_tokenizer))
    monkeypatch.setattr(uvicorn, "run", lambda app, **_: apps.append(app))
    assert api.run(cfg) == 0
    key = {"authorization": "Bearer k"}
    for host, status in [("box.lan", 200), ("proxy.example:443", 200), ("192.168.1.5:8000", 200),
                         ("127.0.0.1", 200), ("attacker.example", 421)]:
        resp = TestClient(apps[0], base_url=f"http://{host}").get("/v1/models", headers=key)
        assert resp.status_code == status, (host, resp.text)
