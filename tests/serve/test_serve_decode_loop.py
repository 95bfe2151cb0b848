"""The decode loop: slot cache, graph-ready steps, old and new loops equal to generate() (fp32)."""

import pytest
import torch

from loratune.serve.engine import Engine
from loratune.serve.multi_lora import MultiLoraLinear
from loratune.serve.pool import AdapterPool
from loratune.serve.slot_cache import SlotCache
from test_serve_engine import PROMPTS, engine_for_loop, request, served_setup

LOOPS = ["slots", "graph-steps", "dynamic"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smol_tokenizer):
    """A tiny Llama, three adapters on disk, generate() references (test_serve_engine's)."""
    return served_setup(tmp_path_factory, smol_tokenizer)


def loop_engine(setup, loop, **kw):
    model, tok, folder, _ = setup
    return engine_for_loop(model, tok, AdapterPool(folder, max_adapters=3), loop, **kw)


@pytest.mark.parametrize("loop", LOOPS)
def test_rows_joining_and_leaving_mid_batch_equal_generate(setup, loop):
    """Mixed adapters, prompts of 1–8 tokens, rows leaving from the middle of the batch (the
    last row moves into the hole) and joining later: every request's greedy tokens equal
    generate() for it alone."""
    refs = setup[3]
    engine = loop_engine(setup, loop, max_batch=4)
    moves = []
    if loop != "dynamic":
        real_move = engine.batch.cache.move
        engine.batch.cache.move = lambda s, d, c: (moves.append((list(s), list(d))),
                                                   real_move(s, d, c))
    plan = {"A": ("a0", 0, 10), "B": (None, 2, 3), "C": ("a1", 1, 10), "D": ("a2", 3, 4),
            "E": ("a0", 2, 8), "F": (None, 0, 4)}
    handles = {}

    def submit(*keys):
        for k in keys:
            name, j, n = plan[k]
            handles[k] = engine.submit(request(PROMPTS[j], {name: 1.0} if name else {},
                                               max_tokens=n))

    submit("A", "B", "C")
    engine.step()                 # A, B, C prefilled together, then one decode step
    engine.step()                 # B has its 3 tokens: it leaves row 1, C moves there
    assert engine.stats()["running"] == 2
    submit("D", "E")
    for _ in range(3):            # D, E join rows 2, 3; D ends (row 2), E moves there
        engine.step()
    submit("F")                   # joins after the moves
    for _ in range(20):
        if not (engine.running or engine.queue):
            break
        engine.step()
    for k, (name, j, n) in plan.items():
        assert handles[k].result().token_ids == refs[(name, j)][:n], k
    if loop != "dynamic":
        assert ([2], [1]) in moves and ([3], [2]) in moves
    engine.stop()


def test_slot_cache_is_written_in_place(setup):
    """Decode steps write into the tensors allocated at the first prefill: no per-step
    concatenation, no reallocation; attention reads views of them."""
    engine = loop_engine(setup, "slots")
    handles = [engine.submit(request(p, {"a1": 1.0}, max_tokens=8)) for p in PROMPTS]
    engine.step()
    cache = engine.batch.cache
    before = [t.data_ptr() for t in cache.keys + cache.values]
    seen = []
    real_update = cache.update

    def update(k, v, layer, *a, **kw):
        keys, values = real_update(k, v, layer, *a, **kw)
        seen.append(keys.data_ptr() == cache.keys[layer].data_ptr())
        return keys, values

    cache.update = update
    for _ in range(7):
        engine.step()
    assert [t.data_ptr() for t in cache.keys + cache.values] == before
    assert seen and all(seen) and cache.generation == 0
    assert all(len(h.result().token_ids) == 8 for h in handles)
    engine.stop()


def test_slot_cache_prefill_decode_grow_and_move():
    cache = SlotCache(rows=3, columns=600)
    assert cache.capacity == 256 and cache.trash == 256
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 2, 3, 4, generator=g), torch.randn(2, 2, 3, 4, generator=g)
    # row 0 has a 2-token prompt (left-padded by one), row 1 a 3-token prompt
    cache.prefill(0, torch.tensor([[cache.trash, 0, 1], [0, 1, 2]]))
    assert cache.update(k, v, 0) == (k, v)          # a prefill attends to its own tokens
    keys = cache.keys[0]
    assert torch.equal(keys[0, :, :2], k[0, :, 1:]) and torch.equal(keys[1, :, :3], k[1])
    cache.reserve(300)                              # grows by doubling, contents kept
    assert cache.capacity == 512 and cache.generation == 1
    keys = cache.keys[0]
    assert keys.shape == (3, 2, 513, 4) and torch.equal(keys[1, :, :3], k[1])
    k1, v1 = torch.randn(2, 2, 1, 4, generator=g), torch.randn(2, 2, 1, 4, generator=g)
    cache.decode(torch.tensor([2, 3]), 16)
    seen_k, seen_v = cache.update(k1, v1, 0)
    assert seen_k.shape == (2, 2, 16, 4) and seen_k.data_ptr() == keys.data_ptr()
    assert torch.equal(keys[0, :, 2], k1[0, :, 0]) and torch.equal(keys[1, :, 3], k1[1, :, 0])
    assert torch.equal(cache.values[0][1, :, 3], v1[1, :, 0])
    row1 = keys[1, :, :4].clone()
    cache.move([1], [0], 4)
    assert torch.equal(keys[0, :, :4], row1)
    with pytest.raises(ValueError, match="601 tokens does not fit the cache's 600"):
        cache.reserve(601)


def test_decode_shaped_batch_takes_all_slots_path_and_equals_rows_alone(setup, monkeypatch):
    """One token per row and no more slots than rows: every slot's A and B in one matmul each,
    the other slots zeroed per row. Equal to each row alone; the gather path is not used."""
    model, _, folder, _ = setup
    pool = AdapterPool(folder, max_adapters=3)
    slots = pool.bind(model)
    try:
        ids = torch.randint(0, 1000, (6, 1), generator=torch.Generator().manual_seed(2))
        row_slots = [pool.acquire({"a0": 1.0}), 0, pool.acquire({"a1": 1.0}),
                     pool.acquire({"a2": 1.0}), pool.acquire({"a0": 1.0}), 0]
        with torch.no_grad():
            alone = []
            for i, s in enumerate(row_slots):
                slots.set([s], ids.device)
                alone.append(model(ids[i:i + 1]).logits)
            monkeypatch.setattr(MultiLoraLinear, "_gathered", None)   # must not be called
            slots.set(row_slots, ids.device)
            mixed = model(ids).logits
        torch.testing.assert_close(mixed, torch.cat(alone), atol=1e-5, rtol=1e-5)
        assert (alone[0] - alone[1]).abs().max() > 1e-2
    finally:
        slots.rows = None


def test_graph_steps_are_recorded_again_when_adapter_layers_change(setup):
    """A recorded step holds the addresses of the slot tensors it read: when a new adapter
    wraps more layers, the steps are recorded anew (and outputs stay right)."""
    refs = setup[3]
    engine = loop_engine(setup, "graph-steps")
    graphs = engine.batch.graphs
    h = engine.submit(request(PROMPTS[0], max_tokens=4))
    while engine.running or engine.queue:
        engine.step()
    assert h.result().token_ids == refs[(None, 0)][:4]
    first = graphs.recorded
    version = graphs.version
    h = engine.submit(request(PROMPTS[0], {"a1": 1.0}, max_tokens=4))
    while engine.running or engine.queue:
        engine.step()
    assert h.result().token_ids == refs[("a1", 0)][:4]
    assert graphs.version != version and graphs.recorded > first
    engine.stop()


def test_models_the_slot_cache_cannot_serve_fall_back_or_are_refused(smol_tokenizer):
    """Sliding-window attention beyond the window: 'auto' keeps the dynamic cache (with the
    reason), 'slots' is refused by name; CUDA graphs without CUDA are refused."""
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=len(smol_tokenizer), hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=128, sliding_window=16)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = MistralForCausalLM(cfg).eval()
    engine = Engine(model, smol_tokenizer, AdapterPool(None), max_completion_tokens=16)
    assert engine.kv_cache == "dynamic" and "sliding-window" in engine.kv_cache_note
    engine.eos = set()
    prompt = [1, 5, 9, 200]
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, 4:].tolist()
    engine.start()
    assert engine.submit(request(prompt, max_tokens=6)).result().token_ids == ref
    engine.stop()
    with pytest.raises(ValueError, match="kv_cache 'slots' cannot serve .*sliding-window"):
        Engine(model, smol_tokenizer, AdapterPool(None), kv_cache="slots")
    model.config.sliding_window = 4096          # wider than any row: slots serve it
    assert Engine(model, smol_tokenizer, AdapterPool(None)).kv_cache == "slots"
    with pytest.raises(ValueError, match="cuda_graphs needs the model on a CUDA device"):
        Engine(model, smol_tokenizer, AdapterPool(None), cuda_graphs=True)


def test_serve_flags_choose_the_cache_and_graphs():
    from loratune.cli import build_parser
    from loratune.config.commands import ServeConfig
    from loratune.flags import config_from_args

    def parse(*argv):
        return config_from_args(ServeConfig, build_parser().parse_args(["serve", *argv]))

    cfg = parse()
    assert (cfg.kv_cache, cfg.cuda_graphs) == ("auto", "auto")
    cfg = parse("--kv-cache", "dynamic", "--cuda-graphs", "off")
    assert (cfg.kv_cache, cfg.cuda_graphs) == ("dynamic", "off")
    with pytest.raises(SystemExit):
        parse("--kv-cache", "paged")



def test_serve_command_runs_the_engine_it_was_told(monkeypatch, smol_tokenizer, capsys):
    """`loratune serve --kv-cache dynamic` serves from a DynamicCache; --cuda-graphs on without
    CUDA is a one-line error naming the option."""
    import uvicorn

    import loratune.models
    from loratune.cli import main
    from tiny import tiny_llama

    served = {}
    monkeypatch.setattr(loratune.models, "load_model",
                        lambda cfg: (tiny_llama(vocab=len(smol_tokenizer)), smol_tokenizer))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(
        engine=app.state.loratune.engine))
    assert main(["serve", "--kv-cache", "dynamic", "--cuda-graphs", "off"]) == 0
    assert served["engine"].kv_cache == "dynamic"
    assert main(["serve"]) == 0
    assert served["engine"].kv_cache == "slots" and not served["engine"].stats()["cuda_graphs"]
    assert main(["serve", "--cuda-graphs", "on"]) == 2
    assert "cuda_graphs needs the model on a CUDA device" in capsys.readouterr().err


def test_all_slots_views_follow_the_layer_to_another_dtype():
    """The all-slots path reads flat views of the slot tensors; .to() must renew them."""
    from loratune.serve.multi_lora import RowSlots

    slots = RowSlots(3)
    layer = MultiLoraLinear(torch.nn.Linear(8, 6), slots, 3)
    g = torch.Generator().manual_seed(0)
    layer.fill(1, torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g))
    layer.fill(2, torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g))
    layer = layer.to(torch.float64)
    assert layer.a_all.dtype == torch.float64
    assert layer.a_all.data_ptr() == layer.lora_A.data_ptr()
    x = torch.randn(4, 1, 8, generator=g, dtype=torch.float64)
    with torch.no_grad():
        slots.set([1, 2, 0, 1], x.device)
        mixed = layer(x)
        alone = []
        for i, s in enumerate([1, 2, 0, 1]):
            slots.set([s], x.device)
            alone.append(layer(x[i:i + 1]))
    torch.testing.assert_close(mixed, torch.cat(alone))
