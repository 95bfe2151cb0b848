"""OFT: identity at init, logits and gradients equal to PEFT's for each of its options, files
both ways, merge and weighted use, block layout, COFT, module dropout, files PEFT refuses."""

import json
import warnings

import pytest
import torch

from loratune.adapters import (AdapterError, add_adapter, load_adapter, merge, merge_and_unload,
                               save_adapter, set_active, unmerge)
from loratune.adapters.inject import adapted_layers
from loratune.adapters.io import adapter_tensors
from loratune.adapters.oft import OftAdapter, cayley, nearest_divisor, skew
from loratune.config import OFTConfig
from tiny import loss_grads, tiny_llama

peft = pytest.importorskip("peft")
IDS = torch.tensor([[3, 7, 11, 2, 64, 99, 5], [9, 8, 7, 6, 5, 4, 3]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def peft_oft(seed=0, **options):
    """PEFT's OFT on a tiny model with random generators (init_weights False)."""
    torch.manual_seed(seed)
    return peft.get_peft_model(tiny_llama(), peft.OFTConfig(
        task_type="CAUSAL_LM", init_weights=False, **{"oft_block_size": 8, **options}))


CASES = {
    "neumann": {"target_modules": ["q_proj", "v_proj", "down_proj"]},
    "exact": {"target_modules": "all-linear", "use_cayley_neumann": False},
    "r_and_block_share": {"r": 4, "oft_block_size": 0, "block_share": True,
                          "target_modules": ["q_proj", "up_proj"]},
    "coft": {"coft": True, "eps": 1e-2, "target_modules": ["k_proj", "o_proj"]},
    "three_terms": {"num_cayley_neumann_terms": 3, "target_modules": ["gate_proj"]},
    # 14 divides neither 32 nor 64: PEFT (and we) take the nearest divisor, 16 on both
    "adjusted_block": {"oft_block_size": 14, "target_modules": ["q_proj", "down_proj"]},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_gradients_and_files_match_peft(tmp_path, case):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's and our warnings on the adjusted block size
        theirs = peft_oft(**CASES[case])
        theirs.save_pretrained(tmp_path / "peft")
        ours = tiny_llama()
        config = load_adapter(ours, tmp_path / "peft")  # PEFT's folder loads here
    assert isinstance(config, OFTConfig)
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-5, rtol=0)
    assert (logits(ours) - logits(tiny_llama())).abs().max() > 1e-3  # the adapter matters

    mine = loss_grads(ours, adapter_tensors(ours, "default"), IDS)
    peft_grads = loss_grads(theirs, {n.replace(".default", ""): p
                                     for n, p in theirs.named_parameters() if p.requires_grad},
                            IDS)
    assert set(mine) == set(peft_grads)
    for key, grad in peft_grads.items():
        torch.testing.assert_close(mine[key], grad, atol=1e-5, rtol=0)

    save_adapter(ours, tmp_path / "ours")  # our folder loads in PEFT, as of its 0.18 series
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        again = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    assert not [w for w in seen if "neumann" in str(w.message).lower()]
    torch.testing.assert_close(logits(again), logits(ours), atol=1e-5, rtol=0)


def test_fresh_oft_is_the_identity_and_shapes_follow_peft():
    model = tiny_llama()
    base = logits(model)
    add_adapter(model, OFTConfig(oft_block_size=8, target_modules=["q_proj", "down_proj"]))
    torch.testing.assert_close(logits(model), base, atol=0, rtol=0)
    shapes = {p.rsplit(".", 1)[-1]: tuple(l.adapters["default"].oft_R.shape)
              for p, l in adapted_layers(model)}
    assert shapes == {"q_proj": (4, 28), "down_proj": (8, 28)}  # in/8 blocks of 8·7/2


def test_rotations_are_orthogonal_and_the_two_transforms_turn_opposite_ways():
    q = skew(torch.randn(3, 6, generator=torch.Generator().manual_seed(0)) * 0.05, 4)
    exact = cayley(q, exact=True, terms=0)
    eye = torch.eye(4).expand(3, 4, 4)
    torch.testing.assert_close(exact @ exact.transpose(-2, -1), eye, atol=1e-6, rtol=0)
    # The series approximates (I + Q)(I − Q)⁻¹, the exact transform of −Q
    series = cayley(q, exact=False, terms=12)
    torch.testing.assert_close(series, cayley(-q, exact=True, terms=0), atol=1e-6, rtol=0)
    assert nearest_divisor(32, 14) == 16 and nearest_divisor(64, 12) == 8  # a tie: the lower
    assert nearest_divisor(30, 7) == 6 and nearest_divisor(16, 40) == 16


@pytest.mark.parametrize("weight", [1.0, 0.4])
def test_merge_unmerge_exact_and_weighted_use_interpolates(weight):
    torch.manual_seed(1)
    model = tiny_llama()
    base = logits(model)
    add_adapter(model, OFTConfig(oft_block_size=8, init_weights=False))
    set_active(model, {"default": weight})
    expected = logits(model)
    merge(model)
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=0)
    unmerge(model)
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=0)
    set_active(model, {"default": 0.0})
    torch.testing.assert_close(logits(model), base, atol=1e-6, rtol=0)
    if weight != 1.0:  # between the base and the adapter, not either
        set_active(model, "default")
        full = logits(model)
        assert (expected - base).abs().max() > 1e-3 and (expected - full).abs().max() > 1e-3
    set_active(model, {"default": weight})
    torch.testing.assert_close(logits(merge_and_unload(model)), expected, atol=1e-5, rtol=0)


def test_coft_keeps_each_generator_within_its_radius():
    torch.manual_seed(0)
    config = OFTConfig(oft_block_size=8, coft=True, eps=1e-3, init_weights=False)
    layer = OftAdapter(32, config)
    layer.scale_input(torch.randn(2, 32))
    radius = 1e-3 / 4 ** 0.5
    norms = 2 ** 0.5 * layer.oft_R.detach().norm(dim=1)
    assert torch.all(norms <= radius * (1 + 1e-5)) and torch.all(norms > radius * 0.99)


def test_module_dropout_leaves_that_share_of_blocks_unturned_in_training_only():
    torch.manual_seed(0)
    layer = OftAdapter(32, OFTConfig(oft_block_size=4, module_dropout=0.5, init_weights=False))
    x = torch.randn(5, 32)
    turned = layer.scale_input(x).view(5, 8, 4)
    unturned = (turned - x.view(5, 8, 4)).abs().amax(dim=(0, 2)) == 0
    assert int(unturned.sum()) == 4  # int(0.5 · 8) blocks are the identity this step
    layer.eval()
    full = layer.scale_input(x).view(5, 8, 4)
    assert not bool(((full - x.view(5, 8, 4)).abs().amax(dim=(0, 2)) == 0).any())


def test_r_and_block_size_are_one_setting():
    with pytest.raises(ValueError, match=r"r=4, oft_block_size=32: give exactly one of them"):
        OFTConfig(r=4)
    assert OFTConfig(r=4, oft_block_size=0).r == 4
    with pytest.raises(ValueError, match=r"r=0, oft_block_size=0"):
        OFTConfig(oft_block_size=0)


def test_files_peft_itself_refuses_or_warns_about(tmp_path):
    model = tiny_llama()
    add_adapter(model, OFTConfig(oft_block_size=8, target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "a")
    config_file = tmp_path / "a" / "adapter_config.json"
    written = json.loads(config_file.read_text())
    assert written["peft_type"] == "OFT" and written["peft_version"] == "0.18.0"

    config_file.write_text(json.dumps({**written, "peft_version": "0.17.1"}))
    with pytest.warns(UserWarning, match=r"Cayley-Neumann series of a PEFT before 0\.18"):
        load_adapter(tiny_llama(), tmp_path / "a")

    old = {k: v for k, v in written.items() if k not in ("oft_block_size", "peft_version")}
    config_file.write_text(json.dumps(old))
    with pytest.raises(AdapterError, match=r"without oft_block_size was written by PEFT before "
                                           r"0\.14"):
        load_adapter(tiny_llama(), tmp_path / "a")


def test_loratune_merge_streams_oft_into_the_base(tmp_path):
    from transformers import AutoModelForCausalLM

    from loratune.export.merge import merge_folder, read_adapters

    tiny_llama().save_pretrained(tmp_path / "base")
    torch.manual_seed(2)
    model = tiny_llama()
    add_adapter(model, OFTConfig(r=4, oft_block_size=0, init_weights=False))
    save_adapter(model, tmp_path / "ad")
    merge_folder(tmp_path / "base", read_adapters([tmp_path / "ad"], [0.6]), tmp_path / "out")
    set_active(model, {"default": 0.6})
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(logits(plain), logits(model), atol=1e-5, rtol=0)
