"""The serving loop's GPU paths: CUDA-graph decode steps, the pool's host tier and slot copies.

Skipped without a CUDA device. fp32, so greedy tokens must equal generate() exactly.
"""

import contextlib

import pytest
import torch

from loratune.adapters import disable_adapters, load_adapter, set_active
from loratune.serve.engine import Engine
from loratune.serve.pool import AdapterPool
from test_serve_engine import PROMPTS, make_adapters, request
from tiny import tiny_llama

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA device (serving's CUDA graphs, host tier)")]
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def on_cuda(tmp_path_factory, smol_tokenizer):
    """A tiny Llama on CUDA (fp32, sdpa), three adapters on disk, generate() references."""
    folder = tmp_path_factory.mktemp("adapters")
    model = tiny_llama(vocab=len(smol_tokenizer))
    names = make_adapters(model, folder)
    model = tiny_llama(vocab=len(smol_tokenizer)).to(CUDA)
    model.set_attn_implementation("sdpa")
    refs = {}
    for name in [None, *names]:
        if name:
            load_adapter(model, folder / name, name)
            set_active(model, [name])
        ctx = disable_adapters(model) if name is None else contextlib.nullcontext()
        with ctx, torch.no_grad():
            for j, p in enumerate(PROMPTS):
                out = model.generate(torch.tensor([p], device=CUDA), max_new_tokens=10,
                                     do_sample=False, eos_token_id=None, pad_token_id=0)
                refs[(name, j)] = out[0, len(p):].tolist()
    fresh = tiny_llama(vocab=len(smol_tokenizer)).to(CUDA)
    fresh.set_attn_implementation("sdpa")
    return fresh, smol_tokenizer, folder, refs


def run_all(engine, refs, names=(None, "a0", "a1", "a2")):
    handles = [((n, j), engine.submit(request(p, {n: 1.0} if n else {})))
               for j, p in enumerate(PROMPTS) for n in names]
    for key, h in handles:
        res = h.result()
        assert res.error is None, res.error
        assert res.token_ids == refs[key], key


@pytest.mark.parametrize("graphs", [True, False])
def test_cuda_decode_loop_equals_generate(on_cuda, graphs):
    """Slots with and without CUDA graphs: every request equals generate() alone; the graphs
    were recorded and kept (no fallback to eager steps)."""
    model, tok, folder, refs = on_cuda
    engine = Engine(model, tok, AdapterPool(folder, max_adapters=3), base_name="tiny",
                    max_completion_tokens=64, cuda_graphs=graphs).start()
    engine.eos = set()
    try:
        run_all(engine, refs)
        run_all(engine, refs)                     # replays of the recorded steps
        assert engine.stats()["cuda_graphs"] is graphs
        if graphs:
            assert engine.batch.graphs.recorded >= 1
    finally:
        engine.stop()


def test_host_tier_and_slot_copies_on_cuda(on_cuda, monkeypatch):
    """One GPU slot, three adapters in rotation: evicted adapters come back from host memory
    (no second disk read), their tensors are copied into the CUDA slot, outputs stay exact."""
    from loratune.serve import pool as pool_mod

    model, tok, folder, refs = on_cuda
    pool = AdapterPool(folder, max_adapters=1, host_adapters=3)
    engine = Engine(model, tok, pool, base_name="tiny", max_completion_tokens=64).start()
    engine.eos = set()
    reads = []
    real = pool_mod.read_lora
    monkeypatch.setattr(pool_mod, "read_lora", lambda *a: reads.append(a[0]) or real(*a))
    try:
        for name in ["a0", "a1", "a2", "a0", "a1", "a2"]:
            got = engine.submit(request(PROMPTS[2], {name: 1.0})).result()
            assert got.error is None and got.token_ids == refs[(name, 2)], name
        assert reads == ["a0", "a1", "a2"]
        assert pool.stats()["host_hits"] == 3 and pool.stats()["evictions"] == 5
        host = {t.device.type for lora in pool.host.values() for ab in lora.layers.values()
                for t in ab}
        assert host == {"cpu"}
        slots = {layer.lora_A.device.type for layer in pool.layers.values()}
        assert slots == {"cuda"}
    finally:
        engine.stop()


def test_cuda_rows_leave_and_join_with_graphs(on_cuda):
    """Rows of different lengths finishing at different steps (rows move in the cache) while
    others join, with recorded steps at several batch buckets."""
    model, tok, folder, refs = on_cuda
    engine = Engine(model, tok, AdapterPool(folder, max_adapters=3), base_name="tiny",
                    max_batch=8, max_completion_tokens=64, cuda_graphs=True)
    engine.eos = set()
    plan = [("a0", 0, 10), (None, 2, 3), ("a1", 1, 7), ("a2", 3, 4), ("a0", 2, 9), (None, 1, 5)]
    handles = []
    for i, (name, j, n) in enumerate(plan):
        handles.append(engine.submit(request(PROMPTS[j], {name: 1.0} if name else {},
                                             max_tokens=n)))
        engine.step()
    while engine.running or engine.queue:
        engine.step()
    for h, (name, j, n) in zip(handles, plan):
        assert h.result().token_ids == refs[(name, j)][:n]
    assert engine.stats()["cuda_graphs"]
    engine.stop()
