"""Every servable method side by side in one mixed batch, unmerged, each row equal to that
adapter's own model (AdaptedLinear with it active) — logits to 1e-5, greedy tokens exactly."""

import contextlib
import shutil

import pytest
import torch

from loratune.adapters import (AdapterHost, add_adapter, delete_adapter, disable_adapters,
                               method_names, method_record, save_adapter, set_active)
from loratune.config import (AdaLoraConfig, BottleneckConfig, IA3Config, LoHaConfig, LoraConfig,
                             MoeLoraConfig, PrefixConfig, PromptConfig)
from loratune.serve.engine import Engine
from loratune.serve.pool import AdapterPool, read_lora
from loratune.serve.types import BadAdapter, GenerationRequest, SamplingParams, ServeError
from tiny import tiny_llama

CONFIGS = {
    "lora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "rslora": LoraConfig(r=8, lora_alpha=4, use_rslora=True,
                         target_modules=["k_proj", "o_proj", "up_proj"]),
    "adalora": AdaLoraConfig(init_r=6, target_r=4, lora_alpha=8,
                             target_modules=["q_proj", "gate_proj"]),
    "dora": LoraConfig(r=4, lora_alpha=8, use_dora=True,
                       target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]),
    "ia3": IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                     feedforward_modules=["down_proj"]),
    "moe_lora": MoeLoraConfig(r=4, lora_alpha=8, num_experts=3, top_k=2,
                              target_modules=["q_proj", "v_proj", "up_proj"]),
    # last: its hosts wrap self_attn and mlp, around the other methods' layers
    "bottleneck": BottleneckConfig(bottleneck_size=8, nonlinearity="gelu"),
}
# lead a row (virtual embeddings; prefix keys/values in its cache): the generation tests only
LEADS = {"prompt": PromptConfig(num_virtual_tokens=4), "prefix": PrefixConfig(num_virtual_tokens=3)}
PROMPTS = [[1, 5, 9, 20, 30], [7, 8], [100, 101, 102, 103, 104, 105, 106], [42]]
NEW_TOKENS = 12


def randomize(model, name, g):
    """Move every trained tensor of adapter `name` off its init, so each changes the output."""
    with torch.no_grad():
        for mod in model.modules():
            ad = mod.adapters[name] if isinstance(mod, AdapterHost) and name in mod.adapters \
                else None
            for key, p in ([] if ad is None else ad.named_parameters()):
                noise = torch.randn(p.shape, generator=g)
                if key in ("ia3_l", "lora_magnitude_vector"):
                    p.mul_(1 + 0.3 * noise)           # scales near their starting point
                else:
                    p.copy_(noise * (0.3 if key != "lora_E" else 1.0))


def greedy(model, prompt):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smol_tokenizer):
    """A tiny Llama with biases (DoRA's shift), one saved adapter per method, and references
    from the unmerged training model with that adapter active."""
    folder = tmp_path_factory.mktemp("methods")
    model = tiny_llama(vocab=len(smol_tokenizer), bias=True)
    g = torch.Generator().manual_seed(3)
    # transformers starts biases at 0: DoRA's shift must show. Small: at 0.3 they made every
    # reply one token whatever came before (AdaLoRA, DoRA, IA³, prompt, prefix changed none)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear) and mod.bias is not None:
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.03)
    ids = torch.randint(0, 1000, (len(CONFIGS) + 1, 6), generator=g)
    refs, logits = {}, {}
    for name, config in CONFIGS.items():
        add_adapter(model, config, name)
        randomize(model, name, g)
        save_adapter(model, folder / name, name)
    for name, config in LEADS.items():      # at the model's top, outside every layer
        add_adapter(model, config, name)
        randomize(model, name, g)
        save_adapter(model, folder / name, name)
    for name in [None, *CONFIGS, *LEADS]:
        ctx = disable_adapters(model) if name is None else contextlib.nullcontext()
        if name:
            set_active(model, [name])
        with ctx, torch.no_grad():
            refs.update({(name, j): greedy(model, p) for j, p in enumerate(PROMPTS)})
            if name not in LEADS:   # their logits carry the virtual positions
                logits[name] = model(ids).logits
    with torch.no_grad():
        set_active(model, {"lora": 0.5, "rslora": 0.5, "adalora": 0.5})
        logits["composed"] = model(ids[:1]).logits
    for name in [*CONFIGS, *LEADS]:
        delete_adapter(model, name)
    return model, folder, refs, logits, ids, smol_tokenizer


def test_rslora_and_the_others_are_served_as_their_records_say(setup):
    model, folder, *_ = setup
    assert method_record("dora").serving.rows and method_record("ia3").serving.rows
    assert method_record("adalora").serving.factors
    ia3 = read_lora("ia3", folder / "ia3", model)
    assert not ia3.layers and set(ia3.scales) == {f"model.layers.{i}.{m}" for i in (0, 1) for m in
                                                  ("self_attn.k_proj", "self_attn.v_proj",
                                                   "mlp.down_proj")}
    assert set(ia3.scales["model.layers.0.mlp.down_proj"]) == {"in_scale"}
    dora = read_lora("dora", folder / "dora", model)
    assert set(dora.scales["model.layers.1.self_attn.o_proj"]) == {"out_scale", "out_shift"}
    assert ia3.why_no_composition and dora.why_no_composition
    assert read_lora("rslora", folder / "rslora", model).why_no_composition is None
    bottleneck = read_lora("bottleneck", folder / "bottleneck", model)
    assert not bottleneck.layers and not bottleneck.scales and bottleneck.why_no_composition
    assert set(bottleneck.blocks) == {f"model.layers.{i}.{m}" for i in (0, 1)
                                      for m in ("self_attn", "mlp")}
    assert {b.reads for b in bottleneck.blocks.values()} == {"output"}
    moe = read_lora("moe_lora", folder / "moe_lora", model)
    assert set(moe.blocks) == {f"model.layers.{i}.{m}" for i in (0, 1) for m in
                               ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj")}
    assert {b.reads for b in moe.blocks.values()} == {"input"} and moe.why_no_composition


@pytest.mark.parametrize("static", [False, True], ids=["eager", "as-recorded"])
def test_one_mixed_forward_equals_each_adapters_own_model(setup, static):
    """Base and every method in one batch (prefill, then a one-token decode step through the
    all-slots path): each row equals the training model with that adapter alone. `static`:
    as a CUDA graph records a step (no branch on which rows use which slot)."""
    model, folder, _, logits, ids, _ = setup
    pool = AdapterPool(folder, max_adapters=len(CONFIGS))
    slots = pool.bind(model)
    try:
        rows = [0, *(pool.acquire({n: 1.0}) for n in CONFIGS)]
        slots.static = static
        with torch.no_grad():
            slots.set(rows, ids.device)
            mixed = model(ids).logits
            slots.set(rows[::-1], ids.device)
            flipped = model(ids.flip(0)[:, :1]).logits
        for i, name in enumerate([None, *CONFIGS]):
            torch.testing.assert_close(mixed[i], logits[name][i], atol=1e-5, rtol=1e-5)
            j = len(rows) - 1 - i       # the flipped batch's row of the same prompt
            torch.testing.assert_close(flipped[j], logits[name][i, :1], atol=1e-5, rtol=1e-5)
            if name is not None:        # each adapter does change its row
                assert (logits[name][i] - logits[None][i]).abs().max() > 1e-3, name
    finally:
        slots.rows, slots.static = None, False


def test_blocks_follow_their_slot_and_leave_with_the_pool(setup):
    """A block added or dropped makes recorded steps be recorded again (generation); an
    evicted block's slot serves the base; a model bound to a new pool keeps no old blocks."""
    model, folder, _, logits, ids, _ = setup
    pool = AdapterPool(folder, max_adapters=1)
    slots = pool.bind(model)
    try:
        before = slots.generation
        slot = pool.acquire({"bottleneck": 1.0})
        assert slots.generation > before
        pool.release(slot)
        before = slots.generation
        assert pool.acquire({"moe_lora": 1.0}) == slot       # bottleneck evicted from `slot`
        assert slots.generation > before
        with torch.no_grad():
            slots.set([slot], ids.device)
            torch.testing.assert_close(model(ids[:1]).logits, logits["moe_lora"][:1],
                                       atol=1e-5, rtol=1e-5)
        AdapterPool(folder).bind(model)        # the old pool's rows would still select slot
        with torch.no_grad():
            torch.testing.assert_close(model(ids[:1]).logits, logits[None][:1],
                                       atol=1e-5, rtol=1e-5)
    finally:
        slots.rows = None


def test_every_method_in_one_batch_with_rows_joining_and_leaving(setup):
    """Requests of every method and the base, of different lengths, some joining while others
    run: each completion equals that adapter's own generate() token for token."""
    model, folder, refs, *_, tok = setup
    names = [None, *CONFIGS, *LEADS]
    for name in names[1:]:        # each adapter changes a reply (biases do not drown them)
        assert any(refs[(name, j)] != refs[(None, j)] for j in range(len(PROMPTS))), name
    engine = Engine(model, tok, AdapterPool(folder, max_adapters=len(names) - 1),
                    base_name="tiny", max_completion_tokens=64)
    engine.eos = set()
    try:
        engine.start()
        first = [((n, j), k, engine.submit(GenerationRequest(
                    PROMPTS[j], {n: 1.0} if n else {}, SamplingParams(max_tokens=k))))
                 for n, j, k in [(n, i % len(PROMPTS), 2 + i * (NEW_TOKENS - 2) // len(names))
                                 for i, n in enumerate(names)]]
        results = {0: first[0][2].result()}   # the shortest has left; the rest run on as these join
        later = [((n, j), NEW_TOKENS, engine.submit(GenerationRequest(
                    PROMPTS[j], {n: 1.0} if n else {}, SamplingParams(max_tokens=NEW_TOKENS))))
                 for n in names[::-1] for j in (1, 3)]
        for i, (key, k, handle) in enumerate(first + later):
            result = results[i] if i in results else handle.result()
            assert result.token_ids == refs[key][:k], key
        stats = engine.stats()
        assert stats["steps"] < sum(k for _, k, _ in first + later) / 2   # batched, not serial
    finally:
        engine.stop()


def test_compositions_stay_in_the_lora_family(setup):
    model, folder, _, logits, ids, tok = setup
    pool = AdapterPool(folder)
    slots = pool.bind(model)
    engine = Engine(model, tok, pool, base_name="tiny")
    for name in CONFIGS:
        pool.check(name)
    try:
        slot = pool.acquire(engine.resolve("lora:0.5+rslora:0.5+adalora:0.5"))
        with torch.no_grad():
            slots.set([slot], ids.device)
            torch.testing.assert_close(model(ids[:1]).logits, logits["composed"], atol=1e-5,
                                       rtol=1e-5)
            slots.rows = None
        for model_field, who in [("dora:0.5+lora:0.5", "dora"), ("ia3:0.5", "ia3"),
                                 ("moe_lora:0.5", "moe_lora"),
                                 ("bottleneck:0.5+lora:0.5", "bottleneck")]:
            adapters = engine.resolve(model_field)
            reason = method_record(who).serving.why_no_composition
            with pytest.raises(ServeError, match=f"{who}.*cannot be composed.*{reason[:20]}"):
                pool.check_weights(adapters)
            with pytest.raises(ServeError, match="cannot be composed"):
                pool.acquire(adapters)
    finally:
        slots.rows = None


def test_unserved_methods_are_refused_with_their_own_reason(setup, tmp_path):
    model, *_ = setup
    refused = [n for n in method_names() if not method_record(n).serving.served]
    assert "loha" in refused and not {"bottleneck", "moe_lora"} & set(refused)
    other = tiny_llama(vocab=model.config.vocab_size, bias=True)
    add_adapter(other, LoHaConfig(r=2, target_modules=["q_proj"]), "h")
    folder = save_adapter(other, tmp_path / "h", "h")
    reason = method_record("loha").serving.why_not
    with pytest.raises(BadAdapter, match=f"is loha: {reason[:30]}.*Merge it into the base"):
        read_lora("h", folder, model)


@pytest.mark.parametrize("method, kind, value, said", [
    ("ia3", "ia3_l", 1e30, "in_scale has values up to"),
    ("dora", "lora_magnitude_vector", 1e30, "out_scale has values up to"),
])
def test_scales_past_the_dtypes_bound_are_refused(setup, tmp_path, method, kind, value, said):
    """Per-channel scales are bounded like LoRA factors: a row cannot turn into inf or NaN."""
    from safetensors.torch import load_file, save_file

    model, folder, *_ = setup
    bad = tmp_path / method
    shutil.copytree(folder / method, bad)
    weights = load_file(bad / "adapter_model.safetensors")
    weights = {k: torch.full_like(v, value) if k.endswith(kind) and "down_proj" in k else v
               for k, v in weights.items()}
    save_file(weights, bad / "adapter_model.safetensors")
    with pytest.raises(BadAdapter, match=rf"adapter 'bad'.*model\.layers\.0\.mlp\.down_proj {said}"):
        read_lora("bad", bad, model)


@pytest.mark.parametrize("method, key, change, said", [
    ("moe_lora", "layers.1.mlp.up_proj.moe_router", lambda t: torch.full_like(t, 1e30),
     r"model\.layers\.1\.mlp\.up_proj moe_router has values up to 1e\+30"),
    ("bottleneck", "layers.0.mlp.adapter_up.bias", lambda t: torch.full_like(t, -3e19),
     r"model\.layers\.0\.mlp adapter_up\.bias has values up to 3e\+19"),
    ("bottleneck", "layers.1.self_attn.adapter_down.weight", lambda t: t[:, :-1],
     r"model\.layers\.1\.self_attn\.adapter_down\.weight has shape \(8, 31\); this model "
     r"needs \(8, 32\)"),
])
def test_bad_blocks_are_refused_naming_the_tensor(setup, tmp_path, method, key, change, said):
    from safetensors.torch import load_file, save_file

    model, folder, *_ = setup
    bad = tmp_path / method
    shutil.copytree(folder / method, bad)
    weights = load_file(bad / "adapter_model.safetensors")
    weights = {k: change(v).contiguous() if k.endswith(key) else v for k, v in weights.items()}
    save_file(weights, bad / "adapter_model.safetensors")
    with pytest.raises(BadAdapter, match=said):
        read_lora("bad", bad, model)
