"""Prompt and prefix tuning served per row (issue 25 item 2): virtual embeddings in front of a
row's prompt, prefix keys/values in its KV cache, beside the base and LoRA/DoRA/IA³ rows in one
batch, each row equal to that adapter's own generate() token for token (fp32)."""

import contextlib

import pytest
import torch
from safetensors.torch import load_file, save_file

from loratune.adapters import (add_adapter, delete_adapter, disable_adapters, method_record,
                               save_adapter, set_active)
from loratune.config import PrefixConfig, PromptConfig
from loratune.serve.engine import Engine
from loratune.serve.pool import AdapterPool, read_lora
from loratune.serve.types import BadAdapter, GenerationRequest, SamplingParams, ServeError
from test_serve_engine import engine_for_loop
from test_serve_methods import CONFIGS, randomize
from tiny import tiny_llama

LEADS = {
    "prompt": PromptConfig(num_virtual_tokens=4),
    "prefix": PrefixConfig(num_virtual_tokens=3),
    # saved as the prefixes its MLP computes (PEFT's inference form)
    "prefix_mlp": PrefixConfig(num_virtual_tokens=5, prefix_projection=True,
                               encoder_hidden_size=24),
}
OTHERS = ["lora", "dora", "ia3"]
PROMPTS = [[1, 5, 9, 20, 30], [7, 8], [100, 101, 102, 103, 104, 105, 106], [42]]
NEW_TOKENS = 10
LOOPS = ["slots", "slots-sdpa", "graph-steps", "dynamic"]


def greedy(model, prompt):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def randomize_host(model, name, g):
    host = model.prefix_encoder if hasattr(model, "prefix_encoder") and \
        name in model.prefix_encoder.adapters else model.prompt_encoder
    with torch.no_grad():
        for p in host.adapters[name].parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smol_tokenizer):
    """A tiny Llama, saved LoRA/DoRA/IA³/prompt/prefix adapters, and each one's own generate()
    per prompt (the training model with that adapter alone active). No biases: random ones make
    this model answer one token whatever comes before (DoRA's bias shift: test_serve_methods)."""
    folder = tmp_path_factory.mktemp("leads")
    model = tiny_llama(vocab=len(smol_tokenizer))
    g = torch.Generator().manual_seed(5)
    for name in OTHERS:
        add_adapter(model, CONFIGS[name], name)
        randomize(model, name, g)
        save_adapter(model, folder / name, name)
    for name, config in LEADS.items():
        add_adapter(model, config, name)
        randomize_host(model, name, g)
        save_adapter(model, folder / name, name)
    refs = {}
    for name in [None, *OTHERS, *LEADS]:
        ctx = disable_adapters(model) if name is None else contextlib.nullcontext()
        if name:
            set_active(model, [name])
        with ctx, torch.no_grad():
            refs.update({(name, j): greedy(model, p) for j, p in enumerate(PROMPTS)})
    for name in [*OTHERS, *LEADS]:
        delete_adapter(model, name)
    assert not hasattr(model, "prompt_encoder") and not hasattr(model, "prefix_encoder")
    return model, folder, refs, smol_tokenizer


def engine_on(setup, loop, **kw):
    """An engine on the `loop` under test (test_serve_engine's loops); "slots-sdpa" is slots
    with sdpa given the boolean masks (the caller puts eager back)."""
    model, folder, _, tok = setup
    model.set_attn_implementation("sdpa" if loop == "slots-sdpa" else "eager")
    return engine_for_loop(model, tok, AdapterPool(folder, max_adapters=4), loop, **kw)


def request(prompt, name, k):
    return GenerationRequest(prompt, {name: 1.0} if name else {}, SamplingParams(max_tokens=k))


def test_prompt_and_prefix_are_served_as_their_records_say(setup):
    model, folder, *_ = setup
    for name, config in LEADS.items():
        lead = read_lora(name, folder / name, model).lead
        n = config.num_virtual_tokens
        if name == "prompt":
            assert lead.embeds.shape == (n, model.config.hidden_size) and lead.key_values is None
        else:   # tiny_llama: 2 layers, 2 kv heads of 8
            assert lead.embeds is None and len(lead.key_values) == 2
            assert lead.key_values[1][0].shape == (2, n, 8)
        assert lead.tokens == n
        assert method_record(config.method).serving.lead is not None


@pytest.mark.parametrize("loop", LOOPS)
def test_prompt_and_prefix_rows_beside_the_others_equal_their_own_generate(setup, loop):
    """Base, LoRA, DoRA, IA³, prompt and prefix rows (prompts of 1–7 tokens, virtual tokens of
    3–5) in one batch of 4 rows: rows leave from the middle (the last moves into the hole, its
    prefix with it) and others join mid-run; every reply equals that adapter's own generate()."""
    refs = setup[2]
    engine = engine_on(setup, loop, max_batch=4)
    try:
        request_all_and_check(engine, refs)
    finally:
        setup[0].set_attn_implementation("eager")
    for name in [*OTHERS, *LEADS]:                  # each adapter changes every reply
        assert all(refs[(name, j)] != refs[(None, j)] for j in range(len(PROMPTS))), name


def request_all_and_check(engine, refs):
    names = ["prompt", None, "prefix", "dora", "prefix_mlp", "lora", "ia3", "prompt", "prefix"]
    plan = [(name, i % len(PROMPTS), 2 + (3 * i) % (NEW_TOKENS - 1))
            for i, name in enumerate(names)]
    handles = [((n, j), k, engine.submit(request(PROMPTS[j], n, k))) for n, j, k in plan]
    for _ in range(200):
        if not engine.queue and not engine.running:
            break
        engine.step()
    for key, k, handle in handles:
        assert handle.result().token_ids == refs[key][:k], key
    assert engine.counts["prefills"] >= 3          # rows joined a running batch


def test_a_prefix_row_moved_into_a_hole_keeps_its_prefix(setup):
    """Slots: the prefix row is the last one when the row before it ends, so it is moved."""
    refs = setup[2]
    engine = engine_on(setup, "slots", max_batch=3)
    moves = []
    real_move = engine.batch.cache.move
    engine.batch.cache.move = lambda s, d, c: (moves.append((list(s), list(d))),
                                               real_move(s, d, c))
    handles = [((n, j), k, engine.submit(request(PROMPTS[j], n, k)))
               for n, j, k in [(None, 0, 6), ("lora", 1, 2), ("prefix", 2, NEW_TOKENS)]]
    while engine.queue or engine.running:
        engine.step()
    assert ([2], [1]) in moves
    for key, k, handle in handles:
        assert handle.result().token_ids == refs[key][:k], key


def test_virtual_tokens_count_in_a_rows_length(setup):
    """A row holds the virtual tokens, the prompt and max_tokens: one that no longer fits the
    server's rows is a 400 naming the adapter and the count, up front once the adapter is read,
    else when its request is admitted; the same request on the base runs."""
    model, folder, _, tok = setup
    engine = Engine(model, tok, AdapterPool(folder, max_adapters=2), base_name="tiny",
                    max_prompt_tokens=8, max_completion_tokens=8)
    assert engine.columns() == 16
    prompt = list(range(1, 9))
    late = engine.submit(request(prompt, "prompt", 8))     # not read yet: refused on admission
    fits = engine.submit(request(prompt, "prefix", 5))     # 3 + 8 + 5 = 16
    base = engine.submit(request(prompt, None, 8))
    for _ in range(20):         # bounded: a row past its cache would raise here instead
        engine.step()
    ended = late.result()
    assert ended.status == 400 and ended.finish_reason == "error"
    assert "adapter 'prompt' puts 4 virtual tokens" in ended.error and "20" in ended.error
    engine.pool.check("prompt")
    with pytest.raises(ServeError, match=r"adapter 'prompt' puts 4 virtual tokens.*with the "
                                         r"prompt \(8 tokens\) and max_tokens \(8\) that is 20, "
                                         r"more than the 16 tokens a row may hold"):
        engine.submit(request(prompt, "prompt", 8))
    assert len(fits.result().token_ids) == 5 and len(base.result().token_ids) == 8
    assert not engine.pool.pins                     # the refused request holds no slot


def test_virtual_tokens_count_in_the_prefill_budget(setup):
    """One prefill takes at most prefill_tokens tokens, a prompt adapter's virtual ones too."""
    engine = engine_on(setup, "slots", prefill_tokens=10)
    first = engine.submit(request([1, 2, 3], "prompt", 5))           # 4 + 3 = 7
    second = engine.submit(request([4, 5, 6], "prompt", 5))          # 7 more: next prefill
    engine.step()
    assert len(engine.running) == 1 and len(engine.queue) == 1
    assert engine.pool.pins == {engine.running[0].slot: 1}          # the waiting one holds none
    while engine.queue or engine.running:
        engine.step()
    assert engine.counts["prefills"] == 2
    assert [h.result().finish_reason for h in (first, second)] == ["length", "length"]


def test_prompt_and_prefix_do_not_compose(setup):
    model, folder, _, tok = setup
    pool = AdapterPool(folder)
    engine = Engine(model, tok, pool, base_name="tiny")
    for name in ["prompt", "prefix", "lora"]:
        pool.check(name)
    for field, who in [("prompt:0.5", "prompt"), ("prefix+lora", "prefix"),
                       ("prompt+prefix", "prompt")]:
        adapters = engine.resolve(field)
        reason = method_record(who).serving.why_no_composition
        with pytest.raises(ServeError, match=f"{who}.*cannot be composed.*{reason[:25]}"):
            pool.check_weights(adapters)
        with pytest.raises(ServeError, match="cannot be composed"):
            pool.acquire(adapters)
    assert not pool.pins


@pytest.mark.parametrize("name, change, said", [
    ("prompt", lambda t: t[:, :16], r"prompt_embeddings has shape \(4, 16\); this model needs "
                                    r"\(4, 32\) \(num_virtual_tokens, hidden size\)"),
    ("prefix", lambda t: t[:2], r"prompt_embeddings has shape \(2, 64\); this model needs "
                                r"\(3, 64\)"),
    ("prompt", lambda t: t.fill_(-3e20), "prompt_embeddings has values up to 3e\\+20"),
    ("prefix", lambda t: t.fill_(1e30), "prompt_embeddings has values up to 1e\\+30"),
])
def test_bad_virtual_tokens_are_refused_naming_the_file(setup, tmp_path, name, change, said):
    import shutil

    model, folder, *_ = setup
    bad = tmp_path / name
    shutil.copytree(folder / name, bad)
    weights = load_file(bad / "adapter_model.safetensors")
    save_file({k: change(v).contiguous() for k, v in weights.items()},
              bad / "adapter_model.safetensors")
    with pytest.raises(BadAdapter, match=f"adapter_model.safetensors.*{said}"):
        read_lora("bad", bad, model)


def test_the_api_answers_400_when_the_virtual_tokens_do_not_fit(setup):
    """Over HTTP the adapter is read before the request is queued, so the 400 comes up front;
    the same prompt with fewer max_tokens is answered with the adapter's own tokens."""
    from fastapi.testclient import TestClient

    from loratune.serve.api import build_app

    model, folder, refs, tok = setup
    engine = Engine(model, tok, AdapterPool(folder, max_adapters=2), base_name="tiny",
                    max_prompt_tokens=8, max_completion_tokens=8)
    engine.eos = set()
    body = {"model": "prefix_mlp", "prompt": PROMPTS[2], "temperature": 0, "max_tokens": 8}
    try:
        with TestClient(build_app(engine.start()), base_url="http://127.0.0.1:8000") as client:
            resp = client.post("/v1/completions", json=body)
            assert resp.status_code == 400, resp.text
            assert "adapter 'prefix_mlp' puts 5 virtual tokens" in resp.json()["error"]["message"]
            assert not engine.queue and not engine.counts["prefills"]
            resp = client.post("/v1/completions", json={**body, "max_tokens": 4})
            assert resp.status_code == 200, resp.text
    finally:
        engine.stop()
    assert resp.json()["choices"][0]["text"] == tok.decode(refs[("prefix_mlp", 2)][:4],
                                                           skip_special_tokens=True)
