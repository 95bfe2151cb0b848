"""The Host/Origin/content-type guard of serve and ui (loratune.http_guard), on a bare app."""

import asyncio

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from loratune.http_guard import HostPolicy, RequestGuard, host_name


def client(bind="127.0.0.1", allowed=(), any_host=False, host="127.0.0.1:8000"):
    app = FastAPI()

    @app.get("/read")
    def read():
        return {"ok": True}

    @app.post("/act")
    def act():
        return {"done": True}

    guarded = RequestGuard(app, HostPolicy(bind, allowed, any_host),
                           lambda status, msg: {"error": msg})
    # Host as a header: starlette's TestClient (1.3) cannot parse "[::1]:8000" in base_url.
    return TestClient(guarded, headers={"Host": host})


def test_host_name_strips_port_and_brackets():
    assert host_name("LocalHost:7860") == "localhost"
    assert host_name("[::1]:9000") == "::1"
    assert host_name("example.com.") == "example.com"
    assert host_name("::1") == "::1"
    assert host_name("127.0.0.1:80.evil.com") == ""     # not a port: matches no allowed name


def test_loopback_hosts_answer_foreign_hosts_refused():
    assert client(host="localhost:8000").get("/read").status_code == 200
    assert client(host="[::1]:8000").get("/read").status_code == 200
    assert client().get("/read", headers={"host": "127.0.0.1:80.evil.com"}).status_code == 421
    r = client(host="attacker.example").get("/read")     # DNS rebinding
    assert r.status_code == 421 and "allowed-host" in r.json()["error"]


def test_allowed_host_and_wildcard_with_key():
    assert client(allowed=["box.lan"], host="box.lan:80").get("/read").status_code == 200
    assert client(bind="0.0.0.0", host="10.1.2.3").get("/read").status_code == 421
    assert client(bind="0.0.0.0", any_host=True, host="10.1.2.3").get("/read").status_code == 200
    # named hosts win over the wildcard: the operator said which names are this server's
    assert client(bind="0.0.0.0", allowed=["box.lan"], any_host=True,
                  host="10.1.2.3").get("/read").status_code == 421


@pytest.mark.parametrize("origin", ["http://evil.com", "null", "http://127.0.0.1:9999"])
def test_cross_origin_posts_refused(origin):
    r = client().post("/act", content=b"{}", headers={"origin": origin,
                                                      "content-type": "application/json"})
    assert r.status_code == 403


def test_same_origin_and_originless_json_posts_pass():
    c = client()
    ok = {"content-type": "application/json"}
    assert c.post("/act", content=b"{}", headers={**ok, "origin": "http://127.0.0.1:8000"}
                  ).status_code == 200
    assert c.post("/act", content=b"{}", headers=ok).status_code == 200


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", None])
def test_post_body_must_be_json(ctype):
    headers = {"content-type": ctype} if ctype else {}
    r = client().post("/act", content=b'{"a": 1}', headers=headers)
    assert r.status_code == 415


def test_bracketed_host_with_trailing_junk_is_no_name_of_ours():
    assert host_name("[::1]evil.com") == "" and host_name("[::1") == ""
    assert host_name("[::1]:x") == "" and host_name("[::1]:8000") == "::1"
    assert client().get("/read", headers={"host": "[::1]evil.com"}).status_code == 421


@pytest.mark.parametrize("name,values", [("host", ["evil.com", "127.0.0.1:8000"]),
                                         ("origin", ["http://evil.com", "http://127.0.0.1:8000"]),
                                         ("content-type", ["text/plain", "application/json"])])
def test_a_repeated_guarded_header_is_refused(name, values):
    guard = RequestGuard(None, HostPolicy("127.0.0.1"), lambda status, msg: {"error": msg})
    sent = []

    async def send(message):
        sent.append(message)

    headers = [(b"host", b"127.0.0.1:8000"), (b"content-length", b"2")]
    headers = [h for h in headers if h[0] != name.encode()]
    headers += [(name.encode(), v.encode()) for v in values]
    scope = {"type": "http", "method": "POST", "headers": headers}
    asyncio.run(guard(scope, None, send))
    assert sent[0]["status"] == 400 and name in sent[1]["body"].decode()
