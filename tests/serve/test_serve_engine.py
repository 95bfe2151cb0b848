"""Serving engine: mixed-adapter batches, continuous batching, the adapter pool, bad adapters."""

import contextlib
import json

import pytest
import torch

from loratune.adapters import (add_adapter, delete_adapter, disable_adapters, save_adapter,
                               set_active)
from loratune.config import LoraConfig, QuantConfig
from loratune.serve.engine import Engine
from loratune.serve.multi_lora import MultiLoraLinear
from loratune.serve.pool import AdapterPool
from loratune.serve.slot_batch import SlotBatch
from loratune.serve.types import (BadAdapter, GenerationRequest, QueueFull, SamplingParams,
                                  ServeError, UnknownAdapter)
from tiny import tiny_llama

TARGETS = [["q_proj", "v_proj", "down_proj"], ["k_proj", "o_proj", "up_proj", "gate_proj"],
           ["q_proj", "v_proj"]]
PROMPTS = [[1, 5, 9, 200, 300], [7, 8], [100, 101, 102, 103, 104, 105, 106, 107], [42]]


def make_adapters(model, folder, n=3, ranks=(4, 8, 2)):
    """Random LoRA adapters of different ranks and targets, saved under `folder`, then removed."""
    for i in range(n):
        name = f"a{i}"
        torch.manual_seed(10 + i)
        add_adapter(model, LoraConfig(r=ranks[i % len(ranks)], lora_alpha=16,
                                      target_modules=TARGETS[i % len(TARGETS)]), name)
        for mod in model.modules():
            if name in getattr(mod, "adapters", {}):
                torch.nn.init.normal_(mod.adapters[name].lora_B, std=0.5)
        save_adapter(model, folder / name, name)
    names = [f"a{i}" for i in range(n)]
    return names


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smol_tokenizer):
    return served_setup(tmp_path_factory, smol_tokenizer)


def served_setup(tmp_path_factory, smol_tokenizer):
    """A tiny Llama (real tokenizer's vocabulary), three adapters on disk, greedy references."""
    folder = tmp_path_factory.mktemp("adapters")
    model = tiny_llama(vocab=len(smol_tokenizer))
    names = make_adapters(model, folder)
    refs = {}
    for name in [None, *names]:
        ctx = disable_adapters(model) if name is None else contextlib.nullcontext()
        if name:
            set_active(model, [name])
        with ctx, torch.no_grad():
            for j, p in enumerate(PROMPTS):
                out = model.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)
                refs[(name, j)] = out[0, len(p):].tolist()
    with torch.no_grad():
        set_active(model, {"a0": 0.7, "a1": 0.3})
        refs["composed"] = model(torch.tensor([PROMPTS[0]])).logits
    for name in names:
        delete_adapter(model, name)
    return model, smol_tokenizer, folder, refs


def new_engine(setup, max_adapters=3, **kw):
    model, tok, folder, _ = setup
    engine = Engine(model, tok, AdapterPool(folder, max_adapters=max_adapters), base_name="tiny",
                    max_completion_tokens=64, **kw)
    engine.eos = set()   # random weights: run every request to max_tokens
    return engine.start()


def engine_for_loop(model, tok, pool, loop, **kw):
    """An engine (not started: the test drives its steps) on the batch `loop` under test:
    "dynamic", "slots", or "graph-steps" (slots with the CUDA-graph runner's padded static
    steps, replayed eagerly: the graph path's CPU check)."""
    engine = Engine(model, tok, pool, base_name="tiny", max_completion_tokens=64,
                    kv_cache="dynamic" if loop == "dynamic" else "slots", **kw)
    engine.eos = set()   # random weights: run every request to max_tokens
    if loop == "graph-steps":
        engine.batch = SlotBatch(model, engine.cache_key, engine.row_slots, engine.device,
                                 rows=engine.max_batch, columns=engine.columns(), graphs="eager",
                                 lock=engine.pool.lock)
    return engine


def request(prompt, adapters=None, **params):
    params.setdefault("max_tokens", 10)
    return GenerationRequest(prompt, adapters or {}, SamplingParams(**params))


def test_mixed_batch_forward_equals_each_row_alone(setup):
    """One forward of rows with different adapters (or none) = each row run with its adapter."""
    model, tok, folder, _ = setup
    pool = AdapterPool(folder, max_adapters=3)
    slots = pool.bind(model)
    try:
        ids = torch.randint(0, 1000, (4, 6), generator=torch.Generator().manual_seed(0))
        row_slots = [pool.acquire({"a0": 1.0}), 0, pool.acquire({"a1": 1.0}),
                     pool.acquire({"a2": 1.0})]
        with torch.no_grad():
            slots.set(row_slots, ids.device)
            mixed = model(ids).logits
            for i, s in enumerate(row_slots):
                slots.set([s], ids.device)
                alone = model(ids[i:i + 1]).logits
                torch.testing.assert_close(mixed[i:i + 1], alone, atol=1e-5, rtol=1e-5)
            slots.set([0], ids.device)
            base = model(ids[1:2]).logits
        assert (mixed[0] - base[0]).abs().max() > 1e-2   # the adapters do change the output
        assert sum(isinstance(m, MultiLoraLinear) for m in model.modules()) == 2 * 7
    finally:
        slots.rows = None


def test_mixed_batch_matches_peft_adapter_names(setup, tmp_path):
    peft = pytest.importorskip("peft")
    model, tok, folder, _ = setup
    theirs = tiny_llama(vocab=len(tok))
    theirs.load_state_dict({k.replace(".base_layer", ""): v for k, v in model.state_dict().items()
                            if "lora_" not in k})
    theirs = peft.PeftModel.from_pretrained(theirs, folder / "a0", adapter_name="a0")
    theirs.load_adapter(folder / "a1", adapter_name="a1")
    pool = AdapterPool(folder, max_adapters=2)
    slots = pool.bind(model)
    ids = torch.randint(0, 1000, (3, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        slots.set([pool.acquire({"a0": 1.0}), pool.acquire({"a1": 1.0}), 0], ids.device)
        ours = model(ids).logits
        slots.rows = None
        ref = theirs(input_ids=ids, adapter_names=["a0", "a1", "__base__"]).logits
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_continuous_batching_equals_each_request_alone(setup):
    """Requests of different lengths and adapters, joining a running batch, match generate()."""
    engine = new_engine(setup)
    refs = setup[3]
    try:
        handles = []
        for name in [None, "a0", "a1", "a2"]:
            for j, p in enumerate(PROMPTS):
                adapters = {name: 1.0} if name else {}
                handles.append(((name, j), engine.submit(request(p, adapters))))
        results = {key: h.result() for key, h in handles}
        for key, res in results.items():
            assert res.token_ids == refs[key], key
            assert res.finish_reason == "length" and res.completion_tokens == 10
        stats = engine.stats()
        assert stats["running"] == 0 and stats["completion_tokens"] == 160
        # Batching happened: far fewer decode steps than one request after another would take.
        assert stats["steps"] < 16 * 9 / 2
    finally:
        engine.stop()


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_joint_prefill_of_padded_prompts_equals_each_alone(setup, attention):
    """Queued before the engine starts, all requests are prefilled in one left-padded forward."""
    model, tok, folder, refs = setup
    model.set_attn_implementation(attention)
    engine = Engine(model, tok, AdapterPool(folder), base_name="tiny")
    engine.eos = set()
    try:
        names = [None, "a0", "a1", "a2"]
        handles = [((n, j), engine.submit(request(p, {n: 1.0} if n else {})))
                   for j, p in enumerate(PROMPTS) for n in names]
        engine.start()
        for key, h in handles:
            assert h.result().token_ids == refs[key], key
        assert engine.stats()["prefills"] == 1
    finally:
        engine.stop()
        model.set_attn_implementation("eager")


def test_composition_equals_weighted_adapters(setup):
    model, tok, folder, refs = setup
    pool = AdapterPool(folder)
    slots = pool.bind(model)
    engine = Engine(model, tok, pool, base_name="tiny")
    slot = pool.acquire(engine.resolve("a0:0.7+a1:0.3"))
    with torch.no_grad():
        slots.set([slot], torch.device("cpu"))
        ours = model(torch.tensor([PROMPTS[0]])).logits
        slots.rows = None
    torch.testing.assert_close(ours, refs["composed"], atol=1e-5, rtol=1e-5)
    assert engine.resolve("a1+a0") == {"a1": 1.0, "a0": 1.0}
    assert engine.resolve("tiny") == {}
    with pytest.raises(UnknownAdapter, match="known: tiny, a0, a1, a2"):
        engine.resolve("a0+nope")


def test_lru_eviction_and_pinned_slots(setup):
    """Two slots, three adapters in rotation: evictions happen, outputs stay right."""
    engine = new_engine(setup, max_adapters=2, max_batch=8)
    refs = setup[3]
    try:
        for round_ in range(2):
            handles = [((n, 0), engine.submit(request(PROMPTS[0], {n: 1.0})))
                       for n in ["a0", "a1", "a2"]]
            for key, h in handles:
                assert h.result().token_ids == refs[key]
        pool = engine.stats()["pool"]
        assert pool["evictions"] >= 4 and pool["live"] <= 2
        assert pool["misses"] == pool["loads"] and pool["hits"] + pool["misses"] == 6
        assert len(engine.pool.loaded()) == 2
    finally:
        engine.stop()


def test_host_tier_brings_evicted_adapters_back_without_a_disk_read(setup, monkeypatch):
    from loratune.serve import pool as pool_mod

    model, tok, folder, refs = setup
    pool = AdapterPool(folder, max_adapters=1, host_adapters=3)
    engine = Engine(model, tok, pool, base_name="tiny").start()
    engine.eos = set()
    reads = []
    real = pool_mod.read_lora
    monkeypatch.setattr(pool_mod, "read_lora", lambda *a: reads.append(a[0]) or real(*a))
    try:
        for name in ["a0", "a1", "a0", "a1"]:
            got = engine.submit(request(PROMPTS[1], {name: 1.0})).result().token_ids
            assert got == refs[(name, 1)]
        assert reads == ["a0", "a1"]      # the second round came from host memory
        assert pool.stats()["host_hits"] == 2 and pool.stats()["evictions"] == 3
    finally:
        engine.stop()


def test_seeded_sampling_repeats_whatever_runs_beside_it(setup):
    engine = new_engine(setup)
    try:
        params = dict(temperature=0.9, top_p=0.9, top_k=50, seed=123, max_tokens=12)
        alone = engine.submit(request(PROMPTS[2], {"a0": 1.0}, **params)).result().token_ids
        others = [engine.submit(request(p, {"a1": 1.0}, temperature=1.0)) for p in PROMPTS]
        again = engine.submit(request(PROMPTS[2], {"a0": 1.0}, **params)).result().token_ids
        other_seed = engine.submit(request(PROMPTS[2], {"a0": 1.0}, **{**params, "seed": 7}))
        for h in others:
            h.result()
        assert alone == again
        assert other_seed.result().token_ids != alone
        greedy = engine.submit(request(PROMPTS[2], {"a0": 1.0}, temperature=1.0, top_k=1))
        assert greedy.result().token_ids == setup[3][("a0", 2)]
    finally:
        engine.stop()


def test_stop_strings_and_streamed_text(setup):
    model, tok, _, refs = setup
    engine = new_engine(setup)
    try:
        full = engine.submit(request(PROMPTS[0], {"a1": 1.0})).result()
        assert full.text == tok.decode(refs[("a1", 0)], skip_special_tokens=True)
        events = list(engine.submit(request(PROMPTS[0], {"a1": 1.0})))
        assert "".join(e.text for e in events) == full.text and len(events) == 11
        stop = full.text[len(full.text) // 2:][:3]
        cut = engine.submit(request(PROMPTS[0], {"a1": 1.0}, stop=[stop])).result()
        assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]
    finally:
        engine.stop()


def test_cancel_frees_the_row_and_slot(setup):
    engine = new_engine(setup)
    try:
        h = engine.submit(request(PROMPTS[0], {"a0": 1.0}, max_tokens=60))
        first = next(iter(h))
        assert first.finish_reason is None
        h.cancel()
        assert h.result().finish_reason == "cancelled"
        engine.submit(request(PROMPTS[1])).result()
        assert engine.stats()["running"] == 0 and not engine.pool.pins
    finally:
        engine.stop()


def test_limits_and_queue_bound(setup):
    model, tok, folder, _ = setup
    engine = Engine(model, tok, AdapterPool(folder), base_name="tiny", max_queue=2,
                    max_prompt_tokens=8, max_completion_tokens=16)   # not started: queue fills
    with pytest.raises(ServeError, match="max_tokens must be between 1 and 16"):
        engine.submit(request(PROMPTS[0], max_tokens=-1))
    with pytest.raises(ServeError, match="max_tokens must be between 1 and 16"):
        engine.submit(request(PROMPTS[0], max_tokens=10**9))
    with pytest.raises(ServeError, match="prompt has 9 tokens"):
        engine.submit(request(list(range(9))))
    with pytest.raises(ServeError, match="prompt is empty"):
        engine.submit(request([]))
    with pytest.raises(UnknownAdapter, match="known: tiny, a0, a1, a2"):
        engine.submit(request(PROMPTS[0], {"zz": 1.0}))
    engine.submit(request(PROMPTS[0]))
    engine.submit(request(PROMPTS[1]))
    with pytest.raises(QueueFull):
        engine.submit(request(PROMPTS[1]))
    engine.stop()


def test_timeout_ends_a_request(setup):
    engine = new_engine(setup)
    try:
        req = request(PROMPTS[0], max_tokens=60)
        req.timeout_s = 0.0
        assert engine.submit(req).result().finish_reason == "timeout"
    finally:
        engine.stop()


def test_bad_adapters_fail_their_request_and_the_server_goes_on(setup, tmp_path, smol_tokenizer):
    model, tok, folder, refs = setup
    other = tiny_llama(vocab=len(smol_tokenizer))
    other.config.hidden_size = 48
    wide = tiny_llama(vocab=len(smol_tokenizer))
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=len(smol_tokenizer), hidden_size=48, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    wide = LlamaForCausalLM(cfg)
    add_adapter(wide, LoraConfig(r=4, target_modules=["q_proj"]), "w")
    save_adapter(wide, tmp_path / "wide", "w")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    import shutil
    shutil.copytree(folder / "a0", tmp_path / "a0")
    engine = Engine(model, tok, AdapterPool(tmp_path), base_name="tiny").start()
    engine.eos = set()
    try:
        res = engine.submit(request(PROMPTS[0], {"wide": 1.0})).result()
        assert res.finish_reason == "error"
        assert "q_proj" in res.error and "(4, 48)" in res.error and "another base" in res.error
        res = engine.submit(request(PROMPTS[0], {"empty": 1.0})).result()
        assert res.finish_reason == "error" and "no adapter_model.safetensors" in res.error
        good = engine.submit(request(PROMPTS[0], {"a0": 1.0})).result()
        assert good.token_ids == refs[("a0", 0)]
        with pytest.raises(BadAdapter, match="not allowed"):
            engine.pool.register("../a0", tmp_path / "a0")
        with pytest.raises(BadAdapter, match="outside the adapter directory"):
            engine.pool.register("x", folder / "a1")
        with pytest.raises(BadAdapter, match="not allowed"):
            engine.resolve("../../etc")
    finally:
        engine.stop()


def test_registered_adapter_and_unload(setup, tmp_path):
    model, tok, folder, refs = setup
    pool = AdapterPool(None, max_adapters=2)
    engine = Engine(model, tok, pool, base_name="tiny").start()
    engine.eos = set()
    try:
        with pytest.raises(UnknownAdapter):
            engine.resolve("mine")
        pool.register("mine", folder / "a2")
        assert pool.names() == ["mine"]
        assert engine.submit(request(PROMPTS[3], {"mine": 1.0})).result().token_ids == \
            refs[("a2", 3)]
        assert pool.loaded() == ["mine"]
        pool.unload("mine")
        assert pool.loaded() == [] and pool.free and not pool.pins
    finally:
        engine.stop()


def test_4bit_base_serves_adapters(setup):
    """A NF4 base: the engine's output equals our adapter layers on the same quantized model."""
    from loratune.adapters import load_adapter
    from loratune.models.quantize import quantize_model

    _, tok, folder, _ = setup
    ref = tiny_llama(vocab=len(tok))
    quantize_model(ref, QuantConfig(blocksize=32))
    load_adapter(ref, folder / "a1", "a1")
    set_active(ref, ["a1"])
    with torch.no_grad():
        expected = ref.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=8, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, 5:].tolist()
    model = tiny_llama(vocab=len(tok))
    quantize_model(model, QuantConfig(blocksize=32))
    engine = Engine(model, tok, AdapterPool(folder), base_name="tiny").start()
    engine.eos = set()
    try:
        got = engine.submit(request(PROMPTS[0], {"a1": 1.0}, max_tokens=8)).result().token_ids
        assert got == expected
    finally:
        engine.stop()


def test_a_failing_forward_fails_its_rows_and_the_engine_goes_on(setup):
    """A failed prefill fails its request; a failed decode step fails the running rows."""
    engine = new_engine(setup)
    try:
        real = engine.model.forward
        calls = []

        def failing(*a, **k):
            calls.append(1)
            if len(calls) in (1, 3):    # the first prefill, then the first decode step
                raise RuntimeError(f"device lost at call {len(calls)}")
            return real(*a, **k)

        engine.model.forward = failing
        res = engine.submit(request(PROMPTS[0])).result()
        assert res.finish_reason == "error" and "call 1" in res.error
        res = engine.submit(request(PROMPTS[0], {"a0": 1.0})).result()
        assert res.finish_reason == "error" and "call 3" in res.error
        assert not engine.pool.pins and engine.stats()["errors"] == 2
        assert engine.submit(request(PROMPTS[0])).result().token_ids == setup[3][(None, 0)]
    finally:
        del engine.model.forward
        engine.stop()


def test_engine_passes_the_cache_under_the_models_own_keyword(setup):
    """transformers 5.24 renamed past_key_values to cache (the old name warns, then goes away in
    5.40): prefill and decode steps must use whichever name the model declares."""
    import warnings

    model, tok, folder, refs = setup
    engine = Engine(model, tok, AdapterPool(folder, max_adapters=3), base_name="tiny",
                    max_completion_tokens=64)
    engine.eos = set()
    handle = engine.submit(request(PROMPTS[0], max_tokens=4))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*")
        for _ in range(5):
            engine.step()
    assert handle.result().token_ids == refs[(None, 0)][:4]


def test_a_checked_adapter_is_read_once(setup, monkeypatch):
    """The API checks an adapter before queueing its request; the pool's first use then takes
    that read instead of reading the folder a second time."""
    import loratune.serve.pool as pool_module

    model, tok, folder, _ = setup
    reads = []
    real = pool_module.read_lora
    monkeypatch.setattr(pool_module, "read_lora", lambda *a: reads.append(a[0]) or real(*a))
    pool = AdapterPool(folder, max_adapters=2, host_adapters=0)
    slots = pool.bind(model)
    try:
        pool.check("a0")
        slot = pool.acquire({"a0": 1.0})
        assert slot is not None and reads == ["a0"]
        pool.release(slot)
        pool.unload("a0")
        pool.acquire({"a0": 1.0})            # nothing kept: a later load reads again
        assert reads == ["a0", "a0"]
    finally:
        slots.rows = None
