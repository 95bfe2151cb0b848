"""The LoRA product's one home (adapters/lora_product.py): every registered backend gives the
reference results, for one adapter and for the server's three slot-stacked forms.

A new backend (a Triton or CUDA kernel) is tested by registering it: `BACKENDS` is whatever
`register_backend` has been given, so these tests take it up with no edit here.
"""

import json
import math

import pytest
import torch

from loratune.adapters import add_adapter, save_adapter
from loratune.adapters.lora_product import backend, backend_names, product, scaled_factors
from loratune.adapters.peft_format import PeftFolder, read_adapter_config, read_peft_weights
from loratune.config import LoraConfig
from tiny import randomize_lora, tiny_llama

BACKENDS = backend_names()
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)]  # (out, factors)


def per_row(x, a, b, scale=1.0):
    """s·x·Aᵀ·Bᵀ in float64: the reference every form is held to."""
    return (x.double() @ a.double().t() @ b.double().t()) * scale


def close(got, want, dtype):
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("out_dtype, dtype", DTYPES)
def test_shrink_then_expand_add_is_base_plus_scaled_product(name, out_dtype, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=g).to(out_dtype)
    a, b = torch.randn(4, 16, generator=g, dtype=dtype), torch.randn(24, 4, generator=g, dtype=dtype)
    out = torch.randn(2, 5, 24, generator=g).to(out_dtype)
    run = backend(name)
    got = run.expand_add(out, run.shrink(x, a), b, 0.5)
    assert got.dtype == out_dtype and got.shape == out.shape
    close(got, out.double() + per_row(x, a, b, 0.5), out_dtype)
    close(product(x, a, b, 0.5), per_row(x, a, b, 0.5), out_dtype)


def slots(g, num_slots=4, r=3, d_in=16, d_out=24, dtype=torch.float32):
    """Slot-stacked A [S, r, in] and s·B [out, S, r], slot 0 zeros (the base alone)."""
    a = torch.randn(num_slots, r, d_in, generator=g).to(dtype)
    b = torch.randn(d_out, num_slots, r, generator=g).to(dtype)
    a[0], b[:, 0] = 0, 0
    return a, b


def expected(out, x, a, b, rows):
    return torch.stack([out[i].double() + per_row(x[i], a[s], b[:, s]) for i, s in enumerate(rows)])


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("out_dtype, dtype", DTYPES)
def test_gathered_gives_each_row_its_own_slot(name, out_dtype, dtype):
    g = torch.Generator().manual_seed(1)
    a, b = slots(g, dtype=dtype)
    x = torch.randn(4, 6, 16, generator=g).to(out_dtype)
    out = torch.randn(4, 6, 24, generator=g).to(out_dtype)
    rows = [2, 0, 3, 2]
    want = expected(out, x, a, b, rows)
    got = backend(name).gathered(out.clone(), x, a, b, torch.tensor(rows))
    close(got, want, out_dtype)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("out_dtype, dtype", DTYPES)
def test_all_slots_zeroes_the_slots_a_row_does_not_use(name, out_dtype, dtype):
    g = torch.Generator().manual_seed(2)
    a, b = slots(g, dtype=dtype)
    num_slots, r = a.shape[:2]
    x = torch.randn(5, 1, 16, generator=g).to(out_dtype)
    out = torch.randn(5, 1, 24, generator=g).to(out_dtype)
    rows = torch.tensor([1, 3, 0, 1, 2])
    others = (rows[:, None] != torch.arange(num_slots))[..., None].expand(5, num_slots, r)
    a_all, b_all = a.reshape(-1, 16).t(), b.reshape(24, -1).t()
    got = backend(name).all_slots(out.clone(), x, a_all, b_all, others.reshape(5, -1))
    close(got, expected(out, x, a, b, rows.tolist()), out_dtype)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("out_dtype, dtype", DTYPES)
def test_one_slot_for_the_whole_batch(name, out_dtype, dtype):
    g = torch.Generator().manual_seed(3)
    a, b = slots(g, dtype=dtype)
    x = torch.randn(3, 4, 16, generator=g).to(out_dtype)
    out = torch.randn(3, 4, 24, generator=g).to(out_dtype)
    got = backend(name).one_slot(out.clone(), x, a[2], b[:, 2])
    close(got, expected(out, x, a, b, [2, 2, 2]), out_dtype)


def test_an_unknown_backend_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="LoRA backend 'sgmv' is not registered; choose from torch"):
        backend("sgmv")


def test_scaled_factors_fold_each_modules_own_scale_into_b(tmp_path):
    """The scale of every module (its alpha_pattern entry, rsLoRA's root) goes into B once."""
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, use_rslora=True,
                                  target_modules=["q_proj", "v_proj"]))
    randomize_lora(model)
    save_adapter(model, tmp_path / "ad")
    config_file = tmp_path / "ad" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                       "alpha_pattern": {"q_proj": 3}}))
    cfg, raw = read_adapter_config(tmp_path / "ad")
    tensors = read_peft_weights(tmp_path / "ad", cfg, raw).tensors
    factors = scaled_factors(PeftFolder(tmp_path / "ad", cfg, raw, tensors))
    assert len(factors) == 4
    for path, (a, b) in factors.items():
        live = model.get_submodule(path).adapters["default"]
        alpha = 3 if path.endswith("q_proj") else 8
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(b @ a, live.lora_B.detach() @ live.lora_A.detach()
                                   * alpha / math.sqrt(4))
