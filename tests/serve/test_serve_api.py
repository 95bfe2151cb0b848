"""The OpenAI-compatible API on the real Engine: tiny Llama, real SmolLM2 tokenizer, real adapters.

Greedy answers through HTTP must be exactly the engine's own answers for the same request;
every documented error must come back with its status and OpenAI's error shape.
"""

import contextlib
import json
import re
import socket
import threading
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from loratune.adapters import add_adapter, save_adapter
from loratune.config import LoraConfig
from loratune.eval.generate import prompt_ids
from loratune.serve import api as serve_api
from loratune.serve.api import build_app
from loratune.serve.engine import Engine
from loratune.serve.pool import AdapterPool
from loratune.serve.router import LanguageRouter, detect_language
from loratune.serve.types import GenerationRequest, SamplingParams
from tiny import randomize_lora, tiny_llama

BASE = "tiny-base"
ZH = [{"role": "user", "content": "请用一句话解释什么是低秩适配。"}]
EN = [{"role": "user", "content": "Explain low-rank adaptation in one sentence."}]
SLOW = {"seconds": 0.0}   # per-forward delay, so a client can hang up mid-generation
LOCAL = "http://127.0.0.1:8000"   # the Host a client on this machine sends (the guard checks it)
JSON = {"content-type": "application/json"}   # raw bodies: the guard wants a JSON type


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread (modules that decode on a shared CPU use it): two threads make every
    small op of the decode loop wait for the other (50 ms instead of 2 for a vocabulary-wide
    mask)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def live_server(app):
    """`app` served by uvicorn on a free local port in a thread; yields its base URL and stops
    it on exit."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
    assert not thread.is_alive()


def _save_lora(tok, folder, name, seed):
    m = tiny_llama(vocab=len(tok))
    add_adapter(m, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
                name)
    randomize_lora(m, seed=seed, scale=1.0)
    save_adapter(m, folder, name)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, smol_tokenizer):
    root = tmp_path_factory.mktemp("adapters")
    for seed, name in enumerate(["adapter_zh", "adapter_en", "fin"], start=1):
        _save_lora(smol_tokenizer, root / name, name, seed)
    _save_lora(smol_tokenizer, root / "more" / "late", "late", 7)   # registered via the API
    broken = root / "broken"                # config fine, weights of another model's shapes
    broken.mkdir()
    (broken / "adapter_config.json").write_text((root / "fin" / "adapter_config.json").read_text())
    q_proj = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{q_proj}.lora_A.weight": torch.zeros(4, 7),
               f"{q_proj}.lora_B.weight": torch.zeros(32, 4)},
              str(broken / "adapter_model.safetensors"))
    return root


def slow_engine(adapter_dir, tokenizer, slow: dict, max_adapters: int):
    """A started engine on a tiny model whose every forward sleeps slow["seconds"] (so a
    request can still be running when the test acts); stop() it after use."""
    model = tiny_llama(vocab=len(tokenizer))
    model.register_forward_pre_hook(lambda *_: time.sleep(slow["seconds"]))
    return Engine(model, tokenizer, AdapterPool(adapter_dir, max_adapters=max_adapters),
                  base_name=BASE, max_batch=4, max_queue=8, max_prompt_tokens=96,
                  max_completion_tokens=64).start()


@pytest.fixture(scope="module")
def engine(adapter_dir, smol_tokenizer):
    eng = slow_engine(adapter_dir, smol_tokenizer, SLOW, max_adapters=3)
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def client(engine):
    router = LanguageRouter.parse("zh=adapter_zh,en=adapter_en")
    with TestClient(build_app(engine, router=router), base_url=LOCAL) as c:
        yield c


def reference(engine, ids, model, max_tokens=10):
    """The engine's own greedy answer, without HTTP."""
    req = GenerationRequest(list(ids), engine.resolve(model),
                            SamplingParams(max_tokens=max_tokens, temperature=0.0))
    return engine.submit(req).result()


def chat(client, model, messages=EN, **extra):
    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": 10, **extra}
    return client.post("/v1/chat/completions", json=body)


def sse_events(lines) -> list:
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def parse_metrics(text: str) -> dict:
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)', line)
        assert m, f"not a Prometheus sample line: {line!r}"
        labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        samples[(m.group(1), labels)] = float(m.group(3))
    return samples


def assert_error(resp, status, code=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) >= {"message", "type", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code
    return err


# -- generation ---------------------------------------------------------------------------------
def test_chat_greedy_equals_engine_and_adapters_differ(client, engine, smol_tokenizer):
    ids = prompt_ids(smol_tokenizer, EN)
    texts = {}
    for model in ["adapter_zh", "adapter_en", BASE, "adapter_zh:0.5+fin:0.5"]:
        resp = chat(client, model)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        ref = reference(engine, ids, model)
        choice = body["choices"][0]
        assert body["object"] == "chat.completion" and body["model"] == model
        assert choice["message"] == {"role": "assistant", "content": ref.text}
        assert choice["finish_reason"] == ref.finish_reason
        assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens":
                                 ref.completion_tokens,
                                 "total_tokens": len(ids) + ref.completion_tokens}
        texts[model] = ref.text
    assert texts["adapter_zh"] != texts["adapter_en"] != texts[BASE]
    assert texts["adapter_zh:0.5+fin:0.5"] != texts["adapter_zh"]


def test_completions_equal_engine(client, engine, smol_tokenizer):
    prompt = "The capital of France is"
    resp = client.post("/v1/completions", json={"model": "fin", "prompt": prompt,
                                                "temperature": 0, "max_tokens": 8})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    ref = reference(engine, smol_tokenizer(prompt)["input_ids"], "fin", 8)
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == ref.text
    assert body["usage"]["completion_tokens"] == ref.completion_tokens == 8
    # Token ids as the prompt give the same answer.
    resp = client.post("/v1/completions", json={"model": "fin", "temperature": 0, "max_tokens": 8,
                                                "prompt": smol_tokenizer(prompt)["input_ids"]})
    assert resp.json()["choices"][0]["text"] == ref.text


def test_streaming_chunks_add_up_to_the_answer(client, engine, smol_tokenizer):
    body = {"model": "adapter_en", "messages": EN, "temperature": 0, "max_tokens": 12,
            "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events(resp.iter_lines())
    ref = reference(engine, prompt_ids(smol_tokenizer, EN), "adapter_en", 12)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "adapter_en"
               for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == ref.text
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert [f["choices"][0]["finish_reason"] for f in finals] == [ref.finish_reason]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12

    body = {"model": "fin", "prompt": "Hello", "temperature": 0, "max_tokens": 6, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as resp:
        events = sse_events(resp.iter_lines())
    ref = reference(engine, smol_tokenizer("Hello")["input_ids"], "fin", 6)
    assert "".join(c["choices"][0]["text"] for c in events[:-1]) == ref.text
    assert events[-2]["choices"][0]["finish_reason"] == "length" and events[-1] == "[DONE]"


# -- models, adapters, metrics, auth --------------------------------------------------------------
def test_models_list_and_adapter_load_unload(client, engine, adapter_dir):
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids == [BASE, "adapter_en", "adapter_zh", "broken", "fin", "auto"]

    err = assert_error(chat(client, "late"), 404, "model_not_found")
    # every name /v1/models lists, the base model's too (issue 24 item 6)
    assert err["message"].endswith("known: " + ", ".join(ids)) and err["param"] == "model"
    err = assert_error(chat(client, "fin:0.5+late"), 404, "model_not_found")
    assert err["message"].endswith("known: " + ", ".join(ids))
    resp = client.post("/v1/adapters/load", json={"name": "late",
                                                  "path": str(adapter_dir / "more" / "late")})
    assert resp.status_code == 200, resp.text
    assert "late" in resp.json()["known"]
    assert chat(client, "late").status_code == 200
    assert "late" in engine.pool.loaded()
    assert client.post("/v1/adapters/unload", json={"name": "late"}).json()["loaded"] is False
    assert "late" not in engine.pool.loaded()
    assert chat(client, "late").status_code == 200          # still known: loads again on use

    assert_error(client.post("/v1/adapters/unload", json={"name": "nope"}), 404)
    assert_error(client.post("/v1/adapters/load", json={"name": "x", "path": "/tmp"}), 422)
    assert_error(client.post("/v1/adapters/load", json={"name": "../etc"}), 422)
    assert_error(client.post("/v1/adapters/load", json={"name": "ghost"}), 404)
    assert_error(client.post("/v1/adapters/load", json={"name": "broken"}), 422, "bad_adapter")
    assert_error(client.post("/v1/adapters/load", json={"nam": "x"}), 400)


def test_metrics_count_what_was_served(engine):
    with TestClient(build_app(engine), base_url=LOCAL) as c:
        before = engine.stats()
        usages = [chat(c, "adapter_en").json()["usage"] for _ in range(2)]
        assert chat(c, "no_such").status_code == 404
        resp = c.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    m = parse_metrics(resp.text)
    key = lambda name, **labels: (name, frozenset(labels.items()))  # noqa: E731
    assert m[key("loratune_requests_total", endpoint="chat", model="adapter_en", status="200")] == 2
    assert m[key("loratune_requests_total", endpoint="chat", model="(invalid)", status="404")] == 1
    assert m[key("loratune_completion_tokens_total", model="adapter_en")] == \
        sum(u["completion_tokens"] for u in usages)
    assert m[key("loratune_prompt_tokens_total", model="adapter_en")] == \
        sum(u["prompt_tokens"] for u in usages)
    assert m[key("loratune_request_duration_seconds_count", endpoint="chat")] == 3
    assert m[key("loratune_request_duration_seconds_bucket", endpoint="chat", le="+Inf")] == 3
    after = engine.stats()
    assert after["per_adapter"]["adapter_en"] - before["per_adapter"].get("adapter_en", 0) == 2
    assert m[key("loratune_adapter_requests_total", adapter="adapter_en")] == \
        after["per_adapter"]["adapter_en"]
    for stat in ("hits", "misses", "evictions", "loads"):
        assert m[key(f"loratune_adapter_pool_{stat}_total")] == after["pool"][stat]
    assert m[key("loratune_engine_completion_tokens_total")] == after["completion_tokens"]
    assert m[key("loratune_running_requests")] == 0


def test_api_key(engine):
    with TestClient(build_app(engine, api_key="s3cret"), base_url=LOCAL) as c:
        assert_error(c.get("/v1/models"), 401, "invalid_api_key")
        assert_error(c.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401)
        assert_error(chat(c, "fin"), 401)
        assert_error(c.get("/metrics"), 401)
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/health").json()["status"] == "ok"


# -- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("body, status, words", [
    ({"model": "nope", "messages": EN}, 404, "adapter_en, adapter_zh, broken, fin"),
    ({"model": "fin+nope", "messages": EN}, 404, "nope"),
    ({"model": "broken", "messages": EN}, 422, "broken"),
    ({"model": "fin", "messages": EN, "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "fin", "messages": EN, "max_tokens": 10**9}, 400, "max_tokens"),
    ({"model": "fin", "messages": EN, "max_completion_tokens": 0}, 400, "max_tokens"),
    ({"model": "fin", "messages": []}, 400, "messages"),
    ({"model": "fin", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ({"model": "fin", "messages": EN, "n": 2}, 400, "n=1"),
    ({"model": "fin", "messages": EN, "temperature": 7}, 400, "temperature"),
    ({"model": "fin", "messages": EN, "top_p": 0}, 400, "top_p"),
    ({"messages": EN}, 400, "model"),
    ({"model": "fin", "messages": EN * 40}, 400, "at most 96"),
])
def test_bad_requests(client, body, status, words):
    err = assert_error(client.post("/v1/chat/completions", json=body), status)
    assert words in err["message"]


def test_malformed_json_and_unknown_route(client):
    resp = client.post("/v1/chat/completions", content=b'{"model": "fin", "messages": [',
                       headers=JSON)
    assert_error(resp, 400, "invalid_json")
    assert_error(client.post("/v1/completions", content=b"[1, 2]", headers=JSON), 400,
                 "invalid_json")
    assert_error(client.post("/v1/completions", json={"model": "fin", "prompt": ["a", "b"]}), 400)
    assert_error(client.get("/v1/nothing"), 404)


def test_bad_adapter_does_not_stop_the_others(client):
    assert_error(chat(client, "broken"), 422, "bad_adapter")
    assert chat(client, "adapter_en").status_code == 200


def test_queue_full_is_429(smol_tokenizer):
    model = tiny_llama(vocab=len(smol_tokenizer))
    idle = Engine(model, smol_tokenizer, AdapterPool(None), base_name=BASE, max_queue=1)
    # Never started, so the queue cannot drain.
    idle.submit(GenerationRequest([1, 2, 3], {}, SamplingParams(max_tokens=4)))
    with TestClient(build_app(idle), base_url=LOCAL) as c:
        resp = chat(c, BASE)
    assert_error(resp, 429, "rate_limit_exceeded")
    assert resp.headers["retry-after"] == "1"
    idle.stop()


def test_timeouts_are_504(engine, smol_tokenizer, monkeypatch):
    # The engine's own deadline: expired before admission.
    with TestClient(build_app(engine, request_timeout_s=1e-6), base_url=LOCAL) as c:
        assert_error(chat(c, "fin"), 504, "timeout")
    # The API's safety net, for an engine that never answers.
    monkeypatch.setattr(serve_api, "DEADLINE_GRACE_S", 0.2)
    idle = Engine(tiny_llama(vocab=len(smol_tokenizer)), smol_tokenizer, AdapterPool(None),
                  base_name=BASE)
    with TestClient(build_app(idle, request_timeout_s=0.1), base_url=LOCAL) as c:
        t0 = time.perf_counter()
        assert_error(chat(c, BASE), 504, "timeout")
        assert time.perf_counter() - t0 < 5
        assert idle.queue[0].handle.cancelled.is_set()
        idle.stop()        # while the client's event loop, which the handle wakes, is open


# -- the language router --------------------------------------------------------------------------
@pytest.mark.parametrize("text, lang", [
    ("请用一句话解释什么是低秩适配。", "zh"), ("请解释LoRA的原理", "zh"),
    ("Explain LoRA, please.", "en"), ("What does 你好 mean in English?", "en"),
    ("これは日本語です", "ja"), ("안녕하세요 반갑습니다", "ko"), ("", "en"), ("1234 !?", "en"),
])
def test_detect_language(text, lang):
    assert detect_language(text) == lang


def test_route_parsing():
    r = LanguageRouter.parse("zh=adapter_zh, en=a:0.7+b:0.3,*=fin")
    assert r.routes == {"zh": "adapter_zh", "en": "a:0.7+b:0.3"} and r.default == "fin"
    assert r.route("これは日本語です", BASE) == "fin"
    assert LanguageRouter.parse("zh=x").route("hello", BASE) == BASE
    for bad in ["zh", "zh=", "zh=../x", ""]:
        with pytest.raises(ValueError, match="--route"):
            LanguageRouter.parse(bad)


def test_auto_routes_chinese_to_the_zh_adapter(client, engine, smol_tokenizer):
    for messages, adapter in [(ZH, "adapter_zh"), (EN, "adapter_en")]:
        body = chat(client, "auto", messages).json()
        assert body["model"] == adapter
        ref = reference(engine, prompt_ids(smol_tokenizer, messages), adapter)
        assert body["choices"][0]["message"]["content"] == ref.text
    with TestClient(build_app(engine), base_url=LOCAL) as c:   # no --route: "auto" is refused
        assert "--route" in assert_error(chat(c, "auto"), 400)["message"]


# -- a real server: the official client, disconnects ----------------------------------------------
@pytest.fixture(scope="module")
def server_url(engine):
    router = LanguageRouter.parse("zh=adapter_zh,en=adapter_en")
    with live_server(build_app(engine, router=router)) as url:
        yield url


def test_official_openai_client(server_url, engine, smol_tokenizer):
    import openai

    client = openai.OpenAI(base_url=server_url + "/v1", api_key="unused", max_retries=0)
    ref = reference(engine, prompt_ids(smol_tokenizer, EN), "adapter_en")
    out = client.chat.completions.create(model="adapter_en", messages=EN, temperature=0,
                                         max_tokens=10)
    assert out.choices[0].message.content == ref.text
    assert out.usage.completion_tokens == ref.completion_tokens
    stream = client.chat.completions.create(model="adapter_en", messages=EN, temperature=0,
                                            max_tokens=10, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == ref.text
    text = client.completions.create(model="fin", prompt="Hello", temperature=0, max_tokens=6)
    assert text.choices[0].text == reference(engine, smol_tokenizer("Hello")["input_ids"],
                                             "fin", 6).text
    zh = client.chat.completions.create(model="auto", messages=ZH, temperature=0, max_tokens=10)
    assert zh.model == "adapter_zh"
    assert [m.id for m in client.models.list()][:2] == [BASE, "adapter_en"]
    with pytest.raises(openai.NotFoundError, match="adapter_zh"):
        client.chat.completions.create(model="missing", messages=EN)
    with pytest.raises(openai.BadRequestError, match="n=1"):
        client.chat.completions.create(model="fin", messages=EN, n=2)


def _wait_idle(engine, seconds=5.0):
    deadline = time.time() + seconds
    while engine.stats()["running"] or engine.stats()["queued"]:
        assert time.time() < deadline, f"slot not freed: {engine.stats()}"
        time.sleep(0.02)


def test_disconnect_mid_stream_frees_the_slot(server_url, engine):
    _wait_idle(engine)
    SLOW["seconds"] = 0.03
    try:
        before = engine.stats()["completion_tokens"]
        body = {"model": "adapter_en", "messages": EN, "temperature": 0, "max_tokens": 60,
                "stream": True}
        with httpx.Client(timeout=10) as http:
            with http.stream("POST", server_url + "/v1/chat/completions", json=body) as resp:
                for line in resp.iter_lines():
                    if '"content":"' in line and '"content":""' not in line:
                        assert engine.stats()["running"] == 1
                        break           # first real text: hang up
        _wait_idle(engine)
        generated = engine.stats()["completion_tokens"] - before
        assert 1 <= generated < 40       # cancelled long before max_tokens=60

        before = engine.stats()["completion_tokens"]
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server_url + "/v1/chat/completions", timeout=0.3,
                       json={**body, "stream": False})
        _wait_idle(engine)
        assert engine.stats()["completion_tokens"] - before < 40
        time.sleep(0.3)       # the non-streaming handler records once its watcher saw the hang-up
        gone = parse_metrics(httpx.get(server_url + "/metrics").text)
        assert gone[("loratune_requests_total", frozenset(
            {"endpoint": "chat", "model": "adapter_en", "status": "499"}.items()))] == 2
    finally:
        SLOW["seconds"] = 0.0
