"""Bottleneck adapters: identity at init, hand-computed forward, placements, training, files."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from loratune.adapters.bottleneck import (BottleneckAdapter, BottleneckHost, attach_bottleneck,
                                          bottleneck_config)
from loratune.adapters.inject import AdapterError, hosts
from loratune.config import BottleneckConfig
from loratune.train.loss import causal_lm_loss
from tiny import tiny_llama

IDS = torch.tensor([[3, 7, 11, 2, 64, 99, 5]])
CFG = BottleneckConfig(bottleneck_size=8)


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def bottleneck_hosts(model):
    return [(p, m) for p, m in model.named_modules() if isinstance(m, BottleneckHost)]


def randomize(model, seed=1, scale=0.3):
    """Nonzero up-projections, so adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, host in bottleneck_hosts(model):
            for ad in host.adapters.values():
                ad.adapter_up.weight.copy_(torch.randn(ad.adapter_up.weight.shape, generator=g)
                                           * scale)
                ad.adapter_up.bias.copy_(torch.randn(ad.adapter_up.bias.shape, generator=g) * 0.1)
    return model


def adapted(config=CFG, name="default", seed=0):
    model = tiny_llama(seed)
    attach_bottleneck(model, config, name)
    return randomize(model)


def test_fresh_adapter_is_exactly_the_base():
    base = logits(tiny_llama())
    model = tiny_llama()
    attach_bottleneck(model, CFG, "default")
    assert torch.equal(logits(model), base)


def test_randomized_adapter_changes_logits():
    base = logits(tiny_llama())
    assert (logits(adapted()) - base).abs().max().item() > 1e-3


@pytest.mark.parametrize("act", ["relu", "gelu", "silu", "tanh"])
def test_mlp_host_equals_hand_computation(act):
    model = adapted(BottleneckConfig(bottleneck_size=8, nonlinearity=act))
    host = model.model.layers[0].mlp
    ad = host.adapters["default"]
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        h = host.base_layer(x)
        fn = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}[act]
        inner = fn(h @ ad.adapter_down.weight.T + ad.adapter_down.bias)
        expected = h + inner @ ad.adapter_up.weight.T + ad.adapter_up.bias
        got = host(x)
    assert got.shape == (2, 5, 32)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert (got - h).abs().max().item() > 1e-3


def test_attention_host_changes_only_hidden_and_weights_adapters_in_parallel():
    model = tiny_llama()
    attach_bottleneck(model, CFG, "a")
    attach_bottleneck(model, CFG, "b")
    randomize(model)
    host = model.model.layers[1].self_attn
    assert set(host.adapters) == {"a", "b"}
    x = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(4))
    pos = model.model.rotary_emb(x, torch.arange(6)[None])
    host.active = {"a": 0.5, "b": 2.0}
    with torch.no_grad():
        plain, plain_w = host.base_layer(x, position_embeddings=pos, attention_mask=None)
        out, weights = host(x, position_embeddings=pos, attention_mask=None)
        da, db = host.adapters["a"].delta(plain), host.adapters["b"].delta(plain)
    torch.testing.assert_close(out, plain + 0.5 * da + 2.0 * db, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(weights, plain_w, atol=0, rtol=0)


def test_placements_wrap_the_right_sublayers():
    houlsby = tiny_llama()
    attach_bottleneck(houlsby, CFG, "default")
    assert [p for p, _ in bottleneck_hosts(houlsby)] == [
        "model.layers.0.self_attn", "model.layers.0.mlp",
        "model.layers.1.self_attn", "model.layers.1.mlp"]
    pfeiffer = tiny_llama()
    attach_bottleneck(pfeiffer, BottleneckConfig(placement="pfeiffer", bottleneck_size=8), "p")
    mlps = ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert [p for p, _ in bottleneck_hosts(pfeiffer)] == mlps
    assert [p for p, _ in hosts(pfeiffer)] == mlps  # the generic discovery sees the same hosts
    ad = pfeiffer.model.layers[0].mlp.adapters["p"]
    assert ad.adapter_down.weight.shape == (8, 32) and ad.adapter_up.weight.shape == (32, 8)
    assert ad.config is not None and ad.config.placement == "pfeiffer"


def test_second_adapter_joins_existing_hosts_and_duplicates_are_refused():
    model = tiny_llama()
    attach_bottleneck(model, CFG, "a")
    attach_bottleneck(model, BottleneckConfig(placement="pfeiffer", bottleneck_size=4), "b")
    found = bottleneck_hosts(model)
    assert len(found) == 4
    assert {p: sorted(h.adapters) for p, h in found}["model.layers.0.mlp"] == ["a", "b"]
    assert {p: sorted(h.adapters) for p, h in found}["model.layers.0.self_attn"] == ["a"]
    with pytest.raises(AdapterError, match="already holds .* 'a'"):
        attach_bottleneck(model, CFG, "a")


def test_attributes_of_the_wrapped_module_still_read():
    model = tiny_llama()
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    attach_bottleneck(model, CFG, "default")
    assert model.model.layers[1].self_attn.layer_idx == 1
    assert model.model.layers[1].self_attn.head_dim == attn.head_dim
    assert model.model.layers[1].mlp.gate_proj is mlp.gate_proj


def test_training_lowers_loss_and_only_adapters_get_gradients():
    torch.manual_seed(0)
    model = tiny_llama()
    # The random head (std 0.02) after the final RMSNorm gives logits so flat that no change of
    # the hidden states gets the loss far below uniform (ln 128 = 4.85); a 5x head leaves room.
    with torch.no_grad():
        model.lm_head.weight.mul_(5)
    attach_bottleneck(model, CFG, "default")
    model.requires_grad_(False)
    for _, host in bottleneck_hosts(model):
        host.adapters["default"].requires_grad_(True)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(7))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 4 * 4  # 4 hosts × (down W, down b, up W, up b)
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    losses = []
    for step in range(15):
        total, n = causal_lm_loss(model, batch)
        loss = total / n
        opt.zero_grad()
        loss.backward()
        if step == 0:
            for pname, p in model.named_parameters():
                if ".adapters." in pname:
                    assert p.grad is not None, pname
                else:
                    assert p.grad is None, pname
            ups = [h.adapters["default"].adapter_up.weight.grad for _, h in bottleneck_hosts(model)]
            assert all(g.abs().sum().item() > 0 for g in ups)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.4 and losses[-1] < math.log(128) - 0.3, losses


def test_disabled_hosts_equal_the_base():
    base = logits(tiny_llama())
    model = adapted()
    assert not torch.allclose(logits(model), base)
    for _, host in bottleneck_hosts(model):
        host.disabled = True
    assert torch.equal(logits(model), base)


def test_unwrap_restores_the_original_module_objects():
    model = tiny_llama()
    base = logits(model)
    originals = {f"model.layers.{i}.{s}": model.get_submodule(f"model.layers.{i}.{s}")
                 for i in range(2) for s in ("self_attn", "mlp")}
    attach_bottleneck(model, CFG, "default")
    randomize(model)
    for path, host in bottleneck_hosts(model):
        assert host.unwrap() is originals[path]
        parent, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent), leaf, host.unwrap())
    assert all(model.get_submodule(p) is m for p, m in originals.items())
    assert torch.equal(logits(model), base)


def test_file_tensors_save_and_reload_give_equal_logits(tmp_path):
    model = adapted()
    want = logits(model)
    state = {}
    for path, host in bottleneck_hosts(model):
        state.update(host.file_tensors("default", path))
    assert "base_model.model.model.layers.0.mlp.adapter_down.weight" in state
    assert state["base_model.model.model.layers.1.self_attn.adapter_up.weight"].shape == (32, 8)
    assert len(state) == 4 * 4
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tmp_path / "a.st"))
    (tmp_path / "cfg.json").write_text(json.dumps(bottleneck_config(CFG)))

    fresh = tiny_llama()
    config = BottleneckConfig(**{k: v for k, v in json.loads((tmp_path / "cfg.json").read_text())
                                 .items() if k not in ("peft_type", "task_type")})
    attach_bottleneck(fresh, config, "default")
    assert not torch.allclose(logits(fresh), want)
    live = {}
    for path, host in bottleneck_hosts(fresh):
        live.update(host.file_tensors("default", path))
    loaded = load_file(str(tmp_path / "a.st"))
    assert set(loaded) == set(live)
    with torch.no_grad():
        for key, tensor in loaded.items():
            assert live[key].shape == tensor.shape, key
            live[key].copy_(tensor)
    assert torch.equal(logits(fresh), want)


def test_config_json_fields():
    cfg = BottleneckConfig(placement="pfeiffer", bottleneck_size=16, nonlinearity="gelu",
                           dropout=0.1)
    assert bottleneck_config(cfg) == {
        "peft_type": "LORATUNE_BOTTLENECK", "task_type": "CAUSAL_LM", "placement": "pfeiffer",
        "bottleneck_size": 16, "nonlinearity": "gelu", "dropout": 0.1, "modules_to_save": []}


def test_generate_greedy_matches_step_by_step_argmax():
    model = adapted()
    prompt = torch.tensor([[5, 9, 17, 33]])
    with torch.no_grad():
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                             max_new_tokens=5, do_sample=False, pad_token_id=0)
        ids = prompt
        for _ in range(5):
            nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    assert out.shape == (1, 9)
    assert torch.equal(out, ids)
    # left padding (as eval does) gives the same continuation
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), prompt], dim=1)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        out_pad = model.generate(input_ids=padded, attention_mask=mask, max_new_tokens=5,
                                 do_sample=False, pad_token_id=0)
    assert torch.equal(out_pad[:, 6:], ids[:, 4:])


def test_error_names_the_model_class():
    with pytest.raises(AdapterError, match="Sequential"):
        attach_bottleneck(nn.Sequential(nn.Linear(4, 4)), CFG, "default")


def test_adapter_alone_is_a_residual_block():
    ad = BottleneckAdapter(6, BottleneckConfig(bottleneck_size=3, nonlinearity="tanh"))
    h = torch.randn(4, 6)
    assert torch.equal(ad(h), h)
    with torch.no_grad():
        ad.adapter_up.weight.fill_(0.5)
    expected = h + torch.tanh(ad.adapter_down(h)) @ ad.adapter_up.weight.T
    torch.testing.assert_close(ad(h), expected, atol=1e-6, rtol=1e-6)


def test_generic_add_save_load_delete(tmp_path):
    """Through the lead's generic code: add_adapter / save_adapter / load_adapter / delete."""
    from loratune.adapters import add_adapter, delete_adapter, load_adapter, save_adapter

    model = tiny_llama()
    attn = model.model.layers[0].self_attn
    add_adapter(model, BottleneckConfig(bottleneck_size=8, nonlinearity="silu"), "bn")
    randomize(model)
    want = logits(model)
    save_adapter(model, tmp_path / "bn", name="bn")
    raw = json.loads((tmp_path / "bn" / "adapter_config.json").read_text())
    assert raw["peft_type"] == "LORATUNE_BOTTLENECK" and raw["nonlinearity"] == "silu"
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path / "bn", "bn")
    assert torch.equal(logits(fresh), want)
    delete_adapter(model, "bn")
    assert model.model.layers[0].self_attn is attn and not bottleneck_hosts(model)
    assert torch.equal(logits(model), logits(tiny_llama()))
