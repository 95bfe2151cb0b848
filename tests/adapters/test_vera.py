"""VeRA: identity at init, PEFT's projections drawn bit for bit, logits and gradients equal to
PEFT's, files both ways (with and without the projections), merge, several adapters."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from loratune.adapters import (AdapterError, add_adapter, delete_adapter, load_adapter, merge,
                               merge_and_unload, save_adapter, set_active, unmerge)
from loratune.adapters.inject import adapted_layers
from loratune.adapters.io import adapter_tensors
from loratune.config import VeraConfig
from tiny import loss_grads, tiny_llama

peft = pytest.importorskip("peft")
IDS = torch.tensor([[3, 7, 11, 2, 64, 99, 5], [9, 8, 7, 6, 5, 4, 3]])
# Layers of three shapes (32→32, 32→16, 64→32, 32→64): each uses its own corner of A and B.
TARGETS = ["q_proj", "v_proj", "down_proj", "up_proj"]


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def peft_vera(seed=0, **kw):
    """PEFT's VeRA on a tiny model, its vectors random (init_weights False, then a seed)."""
    options = {"r": 8, "target_modules": TARGETS, "init_weights": False, **kw}
    model = peft.get_peft_model(tiny_llama(), peft.VeraConfig(task_type="CAUSAL_LM", **options))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "vera_lambda" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def peft_trainables(model) -> dict[str, torch.Tensor]:
    """PEFT's trained tensors by the file key they are saved under."""
    return {n.replace(".default", ""): p for n, p in model.named_parameters() if p.requires_grad}


def test_fresh_vera_is_the_identity_with_peft_projections():
    model = tiny_llama()
    base = logits(model)
    add_adapter(model, VeraConfig(r=8, target_modules=TARGETS, projection_prng_key=7))
    torch.testing.assert_close(logits(model), base, atol=0, rtol=0)
    theirs = peft.get_peft_model(tiny_llama(), peft.VeraConfig(
        r=8, target_modules=TARGETS, projection_prng_key=7, task_type="CAUSAL_LM"))
    ours = model.vera_projections.adapters["default"]
    assert ours.vera_A.shape == (8, 64) and ours.vera_B.shape == (64, 8)  # the largest layer's
    assert torch.equal(ours.vera_A, theirs.base_model.vera_A["default"])
    assert torch.equal(ours.vera_B, theirs.base_model.vera_B["default"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("vera_lambda" in n for n in trainable)  # the projections are frozen


@pytest.mark.parametrize("options", [{}, {"save_projection": False, "projection_prng_key": 3},
                                     {"target_modules": "all-linear", "r": 4}])
def test_logits_gradients_and_files_match_peft(tmp_path, options):
    theirs = peft_vera(**options)
    theirs.save_pretrained(tmp_path / "peft")
    ours = tiny_llama()
    config = load_adapter(ours, tmp_path / "peft")  # PEFT's folder loads here
    assert isinstance(config, VeraConfig) and config.r == options.get("r", 8)
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-5, rtol=0)

    mine = loss_grads(ours, adapter_tensors(ours, "default"), IDS)
    peft_grads = loss_grads(theirs, peft_trainables(theirs), IDS)
    assert set(peft_grads) == set(mine) and len(mine) > 0  # the frozen projections have none
    for key, grad in peft_grads.items():
        torch.testing.assert_close(mine[key], grad, atol=1e-5, rtol=0)

    save_adapter(ours, tmp_path / "ours")  # our folder loads in PEFT
    keys = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    saves = options.get("save_projection", True)
    assert ("base_model.vera_A" in keys) == saves and ("base_model.vera_B" in keys) == saves
    again = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    torch.testing.assert_close(logits(again), logits(ours), atol=1e-5, rtol=0)


def test_saved_projections_are_used_not_redrawn(tmp_path):
    """A file's own projections win over projection_prng_key (another machine's generator)."""
    model = tiny_llama()
    add_adapter(model, VeraConfig(r=8, target_modules=TARGETS, init_weights=False))
    with torch.no_grad():
        model.vera_projections.adapters["default"].vera_A.mul_(-2)
    save_adapter(model, tmp_path / "a")
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(logits(fresh), logits(model), atol=1e-6, rtol=0)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a")
    torch.testing.assert_close(logits(theirs), logits(model), atol=1e-5, rtol=0)


def test_projection_keys_must_fit_save_projection(tmp_path):
    model = tiny_llama()
    add_adapter(model, VeraConfig(r=8, target_modules=TARGETS, init_weights=False))
    save_adapter(model, tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v for k, v in tensors.items() if "vera_A" not in k}, str(weights))
    with pytest.raises(AdapterError, match=r"save_projection: true, but adapter_model"
                                           r"\.safetensors has no base_model\.vera_A"):
        load_adapter(tiny_llama(), tmp_path / "a")

    # save_projection false beside stored projections: ignored with a warning, as PEFT does.
    save_file(tensors, str(weights))
    config_file = tmp_path / "a" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                       "save_projection": False}))
    fresh = tiny_llama()
    with pytest.warns(UserWarning, match="save_projection is false: ignoring base_model.vera_A"):
        load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(logits(fresh), logits(model), atol=1e-6, rtol=0)


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_merge_and_unmerge_are_exact(weight):
    model = tiny_llama()
    base = logits(model)
    add_adapter(model, VeraConfig(r=8, target_modules=TARGETS, init_weights=False))
    set_active(model, {"default": weight})
    expected = logits(model)
    merge(model)
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=0)
    unmerge(model)
    set_active(model, {"default": 0.0})
    torch.testing.assert_close(logits(model), base, atol=1e-5, rtol=0)
    set_active(model, "default")
    plain = merge_and_unload(model)
    assert not hasattr(plain, "vera_projections")
    torch.testing.assert_close(logits(plain), logits_of_active(weight=1.0), atol=1e-5, rtol=0)


def logits_of_active(weight):
    model = tiny_llama()
    add_adapter(model, VeraConfig(r=8, target_modules=TARGETS, init_weights=False))
    set_active(model, {"default": weight})
    return logits(model)


def test_two_adapters_keep_their_own_projections():
    model = tiny_llama()
    add_adapter(model, VeraConfig(r=8, target_modules=["q_proj"], projection_prng_key=1), "a")
    add_adapter(model, VeraConfig(r=4, target_modules=TARGETS, projection_prng_key=2), "b")
    host = model.vera_projections
    assert host.adapters["a"].vera_A.shape == (8, 32) and host.adapters["b"].vera_A.shape == (4, 64)
    q = model.model.layers[0].self_attn.q_proj
    assert q.adapters["a"].shared is host.adapters["a"]
    assert q.adapters["b"].shared is host.adapters["b"]
    delete_adapter(model, "a")
    assert list(host.adapters) == ["b"]
    delete_adapter(model, "b")
    assert not hasattr(model, "vera_projections") and not list(adapted_layers(model))


def test_config_parses_before_the_adapters_are_imported():
    """The CLI parses a run config before importing torch: the options class must be there."""
    code = ("import sys; from loratune.config import build_config; "
            "c = build_config({'adapter': {'method': 'vera', 'r': 16}}); "
            "assert c.adapter.r == 16 and 'loratune.adapters' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("save_projection", [True, False])
def test_loratune_merge_streams_vera_into_the_base(tmp_path, save_projection):
    """The streaming merge builds each layer alone: it takes the projections from the folder,
    or draws them at the size of the largest targeted layer of the base."""
    from transformers import AutoModelForCausalLM

    from loratune.export.merge import merge_folder, read_adapters

    tiny_llama().save_pretrained(tmp_path / "base")
    model = tiny_llama()
    add_adapter(model, VeraConfig(r=8, target_modules=TARGETS, init_weights=False,
                                  save_projection=save_projection, projection_prng_key=5))
    save_adapter(model, tmp_path / "ad")
    merge_folder(tmp_path / "base", read_adapters([tmp_path / "ad"], [0.7]), tmp_path / "out")
    set_active(model, {"default": 0.7})
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(logits(plain), logits(model), atol=1e-5, rtol=0)


def test_planner_says_its_lora_estimate_is_an_upper_bound():
    from loratune.config import build_config
    from loratune.plan.from_run import run_notes

    notes = run_notes(build_config({"adapter": {"method": "vera", "r": 64}}))
    assert notes[0].startswith("vera (rank 64) is estimated as LoRA of rank r, an upper bound")
