"""The server against a hostile or careless user (issue 13): each test fails without its fix.

A bad request gets a 4xx and touches nothing else (other requests, adapter slots, the queue);
the event loop never runs templating; the command line refuses unsafe or broken setups.
"""

import contextlib
import json
import shutil
import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient

from loratune.cli import build_parser, main
from loratune.config.commands import ServeConfig
from loratune.flags import config_from_args
from loratune.eval.generate import prompt_ids
from loratune.serve.api import DEFAULT_MAX_BODY_BYTES, build_app, startup_api_key
from loratune.serve.engine import Engine
from loratune.serve.pool import AdapterPool
from loratune.serve.types import GenerationRequest, SamplingParams, ServeError
from test_serve_api import (EN, JSON, LOCAL, _save_lora, assert_error, chat, reference,
                            slow_engine, sse_events)
from tiny import tiny_llama

BASE = "tiny-base"
SLOW = {"seconds": 0.0}   # per-forward delay, so a request is still running when another comes


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, smol_tokenizer):
    root = tmp_path_factory.mktemp("adapters")
    for seed, name in enumerate(["good", "other"], start=1):
        _save_lora(smol_tokenizer, root / name, name, seed)
    garbled = root / "garbled"           # a valid config beside a weights file that is not one
    garbled.mkdir()
    shutil.copy(root / "good" / "adapter_config.json", garbled)
    real = (root / "good" / "adapter_model.safetensors").read_bytes()
    (garbled / "adapter_model.safetensors").write_bytes(real[:8] + b"\xff" * 64 + real[72:200])
    odd = root / "odd"                   # a config value no check foresees: a string alpha
    shutil.copytree(root / "good", odd)
    config = json.loads((odd / "adapter_config.json").read_text())
    (odd / "adapter_config.json").write_text(json.dumps({**config,
                                                         "alpha_pattern": {"q_proj": "eight"}}))
    return root


@pytest.fixture(scope="module")
def engine(adapter_dir, smol_tokenizer):
    eng = slow_engine(adapter_dir, smol_tokenizer, SLOW, max_adapters=2)
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(build_app(engine, request_timeout_s=20), base_url=LOCAL) as c:
        yield c


@pytest.fixture
def slow():
    SLOW["seconds"] = 0.03
    yield
    SLOW["seconds"] = 0.0


@contextlib.contextmanager
def in_flight(engine, work):
    """Run `work()` in a thread; the block starts once the engine generates for it, and its end
    waits for the thread (a client closed with a request in flight hangs)."""
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(result=work()), daemon=True)
    thread.start()
    try:
        deadline = time.time() + 10
        while not engine.stats()["running"]:
            assert time.time() < deadline and thread.is_alive(), "the request never started"
            time.sleep(0.01)
        yield out
    finally:
        thread.join(30)


def wait_idle(engine, seconds=10.0):
    deadline = time.time() + seconds
    while engine.stats()["running"] or engine.stats()["queued"]:
        assert time.time() < deadline, f"the engine did not drain: {engine.stats()}"
        time.sleep(0.02)


def assert_all_slots_free(pool: AdapterPool):
    for name in pool.loaded():
        pool.unload(name)
    assert not pool.pins, f"slots still pinned: {pool.pins}"
    assert sorted(pool.free) == list(range(1, pool.max_adapters + 1))


def within(work, seconds: float = 30.0):
    """work(), or a failure (not a hang) when the engine thread died and nothing answers."""
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(result=work()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert "result" in out, "no answer: is the engine thread still alive?"
    return out["result"]


def ended(handle):
    return within(handle.result)


def started(handle):
    """The first event of a request: it is running."""
    return within(lambda: next(iter(handle)))


def engine_request(prompt, adapters=None, timeout_s=10.0, **params) -> GenerationRequest:
    params.setdefault("max_tokens", 10)
    return GenerationRequest(prompt, adapters or {}, SamplingParams(**params), timeout_s)


# -- 1. a bad request fails alone ------------------------------------------------------------------
def test_out_of_range_seed_is_400_and_leaves_the_running_request_alone(client, engine, slow):
    good = {"temperature": 0, "max_tokens": 30}
    with in_flight(engine, lambda: chat(client, "good", **good)) as out:
        for seed in (2**63, 2**64, -2**63 - 1):
            t0 = time.perf_counter()
            bad = chat(client, "other", temperature=1, seed=seed)
            err = assert_error(bad, 400, "invalid_value")
            assert err["param"] == "seed" and time.perf_counter() - t0 < 2
    resp = out["result"]
    assert resp.status_code == 200, resp.text
    SLOW["seconds"] = 0.0
    ref = reference(engine, prompt_ids(engine.tokenizer, EN), "good", 30)
    assert resp.json()["choices"][0]["message"]["content"] == ref.text
    wait_idle(engine)
    assert_all_slots_free(engine.pool)


def test_engine_refuses_an_out_of_range_seed_at_submit(engine):
    with pytest.raises(ServeError, match="seed"):
        engine.submit(engine_request([1, 2, 3], temperature=1.0, seed=2**64))


@pytest.mark.parametrize("adapter, bad_params, words", [
    ("other", {"seed": 2**64}, "seed"),           # no generator takes it
    ("other", {"top_k": "many"}, "TypeError"),    # fails while sampling, after its prefill
    ("odd", {}, "TypeError"),                     # fails reading the adapter
])
def test_a_request_failing_on_the_engine_thread_fails_alone(engine, slow, adapter, bad_params,
                                                            words):
    """The engine thread's own safety net, behind submit's checks (which _enqueue skips)."""
    good = engine.submit(engine_request([5, 6, 7], {"good": 1.0}, max_tokens=30))
    started(good)
    bad = engine._enqueue(engine_request([5, 6, 7], {adapter: 1.0}, temperature=1.0,
                                         **bad_params))
    t0 = time.perf_counter()
    res = ended(bad)
    assert res.finish_reason == "error" and words in res.error, res
    assert time.perf_counter() - t0 < 2
    assert ended(good).finish_reason in ("length", "stop")
    SLOW["seconds"] = 0.0
    again = ended(engine.submit(engine_request([5, 6, 7], {"good": 1.0}, max_tokens=30)))
    assert again.finish_reason in ("length", "stop")     # the queue still moves
    wait_idle(engine)
    assert_all_slots_free(engine.pool)


def test_a_tiny_temperature_samples_instead_of_failing_the_batch(engine, slow):
    """temperature=1e-300 is in range: logits / 1e-300 overflowed to inf - inf = NaN."""
    good = engine.submit(engine_request([5, 6, 7], {"good": 1.0}, max_tokens=30))
    first = started(good)
    tiny = ended(engine.submit(engine_request([9, 10], temperature=1e-300, seed=1)))
    rest = ended(good)
    SLOW["seconds"] = 0.0
    greedy = ended(engine.submit(engine_request([9, 10], temperature=0.0)))
    assert tiny.finish_reason == "length" and tiny.token_ids == greedy.token_ids
    alone = ended(engine.submit(engine_request([5, 6, 7], {"good": 1.0}, max_tokens=30)))
    assert rest.finish_reason in ("length", "stop")
    assert first.token_ids + rest.token_ids == alone.token_ids
    wait_idle(engine)
    assert_all_slots_free(engine.pool)


def test_garbled_adapter_file_fails_only_its_own_request(engine, client, slow):
    good = engine.submit(engine_request([5, 6, 7], {"good": 1.0}, max_tokens=30))
    first = started(good)
    bad = engine.submit(engine_request([5, 6, 7], {"garbled": 1.0}))
    res = ended(bad)
    assert res.finish_reason == "error", res
    rest = ended(good)
    SLOW["seconds"] = 0.0
    alone = ended(engine.submit(engine_request([5, 6, 7], {"good": 1.0}, max_tokens=30)))
    assert first.token_ids + rest.token_ids == alone.token_ids
    wait_idle(engine)
    assert_all_slots_free(engine.pool)
    assert "garbled" in assert_error(chat(client, "garbled"), 422, "bad_adapter")["message"]


# -- 2. the body size cap --------------------------------------------------------------------------
def test_request_body_over_the_cap_is_413(engine):
    with TestClient(build_app(engine, max_body_bytes=2048), base_url=LOCAL) as c:
        small = {"model": BASE, "prompt": "hi", "max_tokens": 2}
        assert c.post("/v1/completions", json=small).status_code == 200
        big = {**small, "prompt": "x" * 4096}
        err = assert_error(c.post("/v1/completions", json=big), 413, "request_too_large")
        assert "2048" in err["message"] and err["type"] == "invalid_request_error"
        # Chunked, without a Content-Length: counted while it arrives.
        chunks = (b'{"model": "x", "prompt": "' + b"y" * 1000 for _ in range(4))
        assert_error(c.post("/v1/completions", content=chunks, headers=JSON), 413,
                     "request_too_large")
        assert_error(c.post("/v1/adapters/load", content=b" " * 4096, headers=JSON), 413)
    assert DEFAULT_MAX_BODY_BYTES == 4 * 2**20
    assert serve_config([]).max_body_bytes == DEFAULT_MAX_BODY_BYTES
    with TestClient(build_app(engine), base_url=LOCAL) as c:
        huge = b'{"model": "x", "prompt": "' + b"z" * DEFAULT_MAX_BODY_BYTES + b'"}'
        assert_error(c.post("/v1/completions", content=huge, headers=JSON), 413,
                     "request_too_large")


# -- 3. templating off the event loop --------------------------------------------------------------
class SlowTemplate:
    """The real tokenizer whose chat template waits for `release` (a huge or slow template)."""

    def __init__(self, tokenizer, block_s: float):
        self.tokenizer, self.block_s = tokenizer, block_s
        self.entered, self.release = threading.Event(), threading.Event()

    def apply_chat_template(self, *args, **kwargs):
        self.entered.set()
        self.release.wait(self.block_s)
        return self.tokenizer.apply_chat_template(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        return self.tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_chat_templating_does_not_block_health_or_other_requests(smol_tokenizer):
    tok = SlowTemplate(smol_tokenizer, block_s=5.0)
    eng = Engine(tiny_llama(vocab=len(smol_tokenizer)), tok, AdapterPool(None),
                 base_name=BASE).start()
    try:
        with TestClient(build_app(eng), base_url=LOCAL) as c:
            out: dict = {}
            thread = threading.Thread(target=lambda: out.update(r=chat(c, BASE)), daemon=True)
            thread.start()
            try:
                assert tok.entered.wait(10)
                t0 = time.perf_counter()
                assert c.get("/health").json()["status"] == "ok"
                other = c.post("/v1/completions", json={"model": BASE, "prompt": "hi",
                                                        "max_tokens": 3, "stream": True})
                assert sse_events(other.iter_lines())[-1] == "[DONE]"
                waited = time.perf_counter() - t0
            finally:
                tok.release.set()
                thread.join(10)
            assert waited < 2.0, f"/health and a stream waited {waited:.1f} s for a template"
            assert out["r"].status_code == 200
    finally:
        eng.stop()


# -- 4. composition weights ------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["good:nan", "good:inf", "good:-inf", "good:1e999",
                                   "good:0.5+other:NaN"])
def test_composition_weights_must_be_finite(client, engine, model):
    err = assert_error(chat(client, model), 400, "invalid_value")
    assert "finite" in err["message"] and err["param"] == "model"
    with pytest.raises(ServeError, match="finite"):
        engine.resolve(model)


# -- 5. keys, hosts and folders at startup ---------------------------------------------------------
def serve_config(argv) -> ServeConfig:
    """The typed config `loratune serve ARGV` runs with."""
    return config_from_args(ServeConfig, build_parser().parse_args(["serve", *argv]))


def serve_cli(capsys, *argv) -> tuple[int, str]:
    """`loratune serve` up to its first error (the model path does not exist: nothing loads)."""
    code = main(["serve", "--model", "/nonexistent/model", *argv])
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("argv, words", [
    (["--api-key", ""], "--api-key is empty"),
    (["--api-key", "  "], "--api-key is empty"),
    (["--host", "0.0.0.0"], "--insecure-no-key"),
    (["--host", "192.168.1.5"], "--insecure-no-key"),
    (["--host", "::"], "--insecure-no-key"),
    (["--adapters", "/nonexistent/adapters"], "--adapters /nonexistent/adapters"),
])
def test_unsafe_or_broken_startup_is_a_one_line_error(capsys, monkeypatch, argv, words):
    monkeypatch.delenv("LORATUNE_API_KEY", raising=False)
    code, err = serve_cli(capsys, *argv)
    assert code == 2 and words in err and "\n" not in err, err


def test_empty_api_key_variable_is_an_error(capsys, monkeypatch):
    monkeypatch.setenv("LORATUNE_API_KEY", "")
    code, err = serve_cli(capsys)
    assert code == 2 and "LORATUNE_API_KEY is set but empty" in err


@pytest.mark.parametrize("argv", [
    [], ["--host", "localhost"], ["--host", "::1"], ["--host", "0.0.0.0", "--api-key", "k"],
    ["--host", "0.0.0.0", "--insecure-no-key"],
])
def test_safe_startups_pass_the_checks(capsys, monkeypatch, tmp_path, argv):
    monkeypatch.delenv("LORATUNE_API_KEY", raising=False)
    code, err = serve_cli(capsys, *argv, "--adapters", str(tmp_path))
    assert code == 2 and "/nonexistent/model" in err    # got as far as loading the model
    assert startup_api_key(serve_config(argv)) == ("k" if "k" in argv else None)


def test_adapter_loading_needs_an_adapters_folder(engine, adapter_dir):
    model = tiny_llama(vocab=len(engine.tokenizer))
    no_folder = Engine(model, engine.tokenizer, AdapterPool(None), base_name=BASE)
    with TestClient(build_app(no_folder), base_url=LOCAL) as c:
        body = {"name": "mine", "path": str(adapter_dir / "good")}
        err = assert_error(c.post("/v1/adapters/load", json=body), 403, "adapters_disabled")
        assert "--adapters" in err["message"]
        assert no_folder.pool.names() == []


# -- 6. whole characters at max_tokens -------------------------------------------------------------
def byte_token(tokenizer, byte: int) -> int:
    """The byte-level BPE token of one raw byte (GPT-2's byte → printable character table)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    char = chr(byte) if byte in printable else chr(256 + others.index(byte))
    return tokenizer.convert_tokens_to_ids(char)


def chain_model(vocab: int, next_of: dict[int, int]):
    """A tiny Llama whose greedy continuation of token x is next_of[x], next_of[next_of[x]], ...

    Attention and MLP add nothing, so the last hidden state is the token's own embedding;
    orthonormal embeddings for the chain's tokens and lm_head rows equal to them make
    next_of[x] the argmax by a wide margin (logit ~57 against 0).
    """
    model = tiny_llama(vocab=vocab)
    tokens = sorted(set(next_of) | set(next_of.values()))
    basis = torch.linalg.qr(torch.randn(model.config.hidden_size, len(tokens)))[0].T
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        embed = model.get_input_embeddings().weight
        for token, row in zip(tokens, basis):
            embed[token] = row
        for x, y in next_of.items():
            model.lm_head.weight[y] += 10 * embed[x]
    return model


@pytest.fixture(scope="module")
def byte_client(smol_tokenizer):
    tok = smol_tokenizer
    zhong = [byte_token(tok, b) for b in "中".encode()]        # e4 b8 ad: three byte tokens
    smile = tok.encode("😀", add_special_tokens=False)         # f0 9f | 98 | 80: three tokens
    assert tok.decode(zhong) == "中" and len(smile) == 3 and tok.decode(smile) == "😀"
    cycles = {}
    for seq in (zhong, smile):
        cycles.update({a: b for a, b in zip(seq, seq[1:] + seq[:1])})
    hi = tok.encode("Hello world\n", add_special_tokens=False)
    assert len(hi) >= 3 and tok.decode(hi[-1:]) == "\n"
    cycles.update({a: b for a, b in zip(hi, hi[1:] + [tok.eos_token_id])})
    eng = Engine(chain_model(len(tok), cycles), tok, AdapterPool(None), base_name=BASE).start()
    with TestClient(build_app(eng), base_url=LOCAL) as c:
        yield c, {"zh": zhong[-1], "smile": smile[-1], "hello": hi[0],
                  "hello_rest": tok.decode(hi[1:])}
    eng.stop()


@pytest.mark.parametrize("start, max_tokens, text", [
    ("zh", 3, "中"), ("zh", 4, "中"), ("zh", 5, "中"), ("zh", 6, "中中"), ("zh", 2, ""),
    ("smile", 4, "😀"), ("smile", 5, "😀"), ("smile", 2, ""),
])
@pytest.mark.parametrize("stream", [False, True])
def test_reply_cut_at_max_tokens_ends_with_a_whole_character(byte_client, start, max_tokens,
                                                             text, stream):
    client, first = byte_client
    body = {"model": BASE, "prompt": [first[start]], "max_tokens": max_tokens, "temperature": 0,
            "stream": stream}
    resp = client.post("/v1/completions", json=body)
    assert resp.status_code == 200, resp.text
    if stream:
        chunks = sse_events(resp.iter_lines())[:-1]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        got = "".join(c["choices"][0]["text"] for c in chunks)
    else:
        choice = resp.json()["choices"][0]
        assert choice["finish_reason"] == "length"
        assert resp.json()["usage"]["completion_tokens"] == max_tokens
        got = choice["text"]
    assert got == text


def test_text_held_back_for_a_stop_string_is_sent_at_eos(byte_client):
    """"Hello" → " world\\n" then eos, stop "\\n\\n": the "\\n" waited for a second one."""
    client, first = byte_client
    rest = first["hello_rest"]
    body = {"model": BASE, "prompt": [first["hello"]], "max_tokens": 10, "temperature": 0,
            "stop": ["\n\n"]}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    assert choice == {"index": 0, "text": rest, "logprobs": None, "finish_reason": "stop"}
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
        chunks = sse_events(resp.iter_lines())[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == rest
