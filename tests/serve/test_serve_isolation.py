"""One request never reaches another's answers (issue 23, item 1).

The attack: composition weights finite as float64 but not as float32 ("a1:1e39",
"a1:1e308+a1:1e308"), an adapter whose values are all 3e38 (finite, so no NaN/Inf check
saw it), and one whose values pass every static bound yet overflow inside the forward. Sent
while other requests run, each is refused or fails alone, and afterwards 14 concurrent base
requests give exactly their serial greedy answers (before the fix: 0/6 in flight and 1/14
after unloading, from 0·inf in the all-slots LoRA matmul and NaN left in freed KV rows).
"""

import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from loratune.serve.api import build_app
from loratune.serve.engine import Engine
from loratune.serve.pool import AdapterPool
from loratune.serve.slot_batch import SlotBatch
from test_serve_api import _save_lora, assert_error
from tiny import tiny_llama

BASE = "tiny-base"
SLOW = {"seconds": 0.0}
PROMPTS = [f"word {i} " * (1 + i % 5) for i in range(14)]   # unequal lengths: padded prefills
# Longer than any answer above: its KV row's columns reach past where later rows end.
ATTACK_PROMPT = "overflow " * 40


def _filled(root, name, values):
    """A copy of adapter a1 whose every lora_A / lora_B value is values["A"] / values["B"]."""
    folder = root / name
    folder.mkdir()
    shutil.copy(root / "a1" / "adapter_config.json", folder)
    weights = load_file(str(root / "a1" / "adapter_model.safetensors"))
    save_file({k: torch.full_like(v, values["A" if "lora_A" in k else "B"])
               for k, v in weights.items()}, str(folder / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, smol_tokenizer):
    root = tmp_path_factory.mktemp("adapters")
    _save_lora(smol_tokenizer, root / "a1", "a1", 1)
    _filled(root, "huge", {"A": 3e38, "B": 3e38})
    # Within the float32 bound (1.8e19; B is scaled by lora_alpha / r = 2) and finite, but
    # x·A·B overflows in the first layer: only the logits show it.
    _filled(root, "edge", {"A": 1.8e19, "B": 9e18})
    return root


@pytest.fixture(scope="module")
def one_thread():
    """A model this small steps faster on one thread than on two that wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["slots", "dynamic", "graph-steps"])
def client(request, adapter_dir, smol_tokenizer, one_thread):
    """The API on each batch loop; "graph-steps": the CUDA-graph runner's padded static
    steps (rows past the batch read whatever earlier requests left), replayed eagerly."""
    model = tiny_llama(vocab=len(smol_tokenizer))
    model.register_forward_pre_hook(lambda *_: time.sleep(SLOW["seconds"]))
    engine = Engine(model, smol_tokenizer, AdapterPool(adapter_dir, max_adapters=4),
                    base_name=BASE, max_batch=16, max_queue=64, max_prompt_tokens=96,
                    max_completion_tokens=64,
                    kv_cache="dynamic" if request.param == "dynamic" else "slots")
    if request.param == "graph-steps":
        engine.batch = SlotBatch(model, engine.cache_key, engine.row_slots, engine.device,
                                 rows=engine.max_batch, columns=engine.columns(),
                                 graphs="eager", lock=engine.pool.lock)
    engine.start()
    with TestClient(build_app(engine, request_timeout_s=60),
                    base_url="http://127.0.0.1") as c:
        yield c
    engine.stop()


def complete(client, prompt, model=BASE):
    resp = client.post("/v1/completions", json={"model": model, "prompt": prompt,
                                                "max_tokens": 12, "temperature": 0})
    return resp


def text(resp) -> str:
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["text"]


def concurrently(client, models):
    with ThreadPoolExecutor(len(models)) as pool:
        return list(pool.map(lambda pm: complete(client, *pm), zip(PROMPTS, models)))


def wait_running(client, n, timeout=20):
    engine = client.app.state.loratune.engine
    deadline = time.time() + timeout
    while engine.stats()["running"] < n:
        assert time.time() < deadline, "the in-flight requests never started"
        time.sleep(0.01)


ATTACKS = [   # model field, status, words the error must contain
    ("a1:1e39", 400, ["'a1'", "float32"]),
    ("a1:1e308+a1:1e308", 400, ["'a1'", "float32"]),
    ("a1:3e38+a1:3e38", 400, ["'a1'", "6e+38", "float32"]),     # each finite, the sum is not
    ("a1:1e19", 400, ["'a1'", "weight 1e+19", "too large"]),   # a1's B times it overflows
    ("huge", 422, ["'huge'", "lora_A", "3e+38", "float32"]),
    ("edge", 422, ["'edge'", "non-finite logits"]),
    ("a1+edge", 422, ["a1:1+edge:1", "non-finite logits"]),
]


def test_attacks_fail_alone_and_leave_nothing_behind(client):
    serial = [text(complete(client, p)) for p in PROMPTS]
    serial_a1 = [text(complete(client, p, "a1")) for p in PROMPTS]
    assert len(set(serial)) > 1 and serial != serial_a1
    mix = [BASE if i % 2 else "a1" for i in range(13)]
    SLOW["seconds"] = 0.04       # the 13 stay in flight while every attack comes and goes
    try:
        with ThreadPoolExecutor(13) as pool:
            in_flight = pool.map(lambda pm: complete(client, *pm), zip(PROMPTS, mix))
            wait_running(client, 8)
            errors = {model: assert_error(complete(client, ATTACK_PROMPT, model), status)
                      for model, status, _ in ATTACKS}
            answers = [text(r) for r in in_flight]
    finally:
        SLOW["seconds"] = 0.0
    for model, _, words in ATTACKS:
        for word in words:
            assert word in errors[model]["message"], (model, errors[model])
    assert answers == [serial[i] if m == BASE else serial_a1[i] for i, m in enumerate(mix)]
    for name in ["a1", "huge", "edge"]:
        resp = client.post("/v1/adapters/unload", json={"name": name})
        assert resp.status_code == 200, resp.text
    for _ in range(2):
        assert [text(r) for r in concurrently(client, [BASE] * 14)] == serial
    # a1 again, beside the base: its slot and rows are as fresh as the first time.
    models = [BASE if i % 2 else "a1" for i in range(14)]
    expected = [serial[i] if m == BASE else serial_a1[i] for i, m in enumerate(models)]
    assert [text(r) for r in concurrently(client, models)] == expected


def test_value_limit_keeps_products_finite():
    from loratune.serve.pool import value_limit

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        top = torch.tensor(value_limit(dtype), dtype=torch.float32).to(dtype)
        assert torch.isfinite(top * top), dtype
