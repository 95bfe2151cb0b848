"""LoRA inits that move part of the base weight into the adapter: PiSSA, OLoRA (PEFT is the
oracle: same A, B, residual base, logits and gradients) and LoftQ (our NF4); files convert."""

import json

import pytest
import torch

from loratune.adapters import (AdapterError, add_adapter, disable_adapters, load_adapter,
                               merge_and_unload, save_adapter)
from loratune.adapters.host import adapted_layers
from loratune.adapters.loftq import nf4_round_trip
from loratune.config import LoraConfig, QuantConfig
from loratune.models.quantize import quantize_model
from tiny import tiny_llama, train_tiny

peft = pytest.importorskip("peft")
IDS = torch.tensor([[3, 7, 11, 2, 64, 99, 5]])
TARGETS = ["q_proj", "v_proj", "down_proj"]


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def ours(init, **kw):
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=4, init_lora_weights=init, target_modules=TARGETS, **kw))
    return model


def theirs(init, **kw):
    return peft.get_peft_model(tiny_llama(), peft.LoraConfig(
        r=4, init_lora_weights=init, target_modules=TARGETS, **kw))


def perturb(model, seed=3):
    """Stand-in for training: move every A and B a little."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("kw", [{"lora_alpha": 8}, {"lora_alpha": 16, "use_rslora": True}])
def test_init_logits_and_gradients_equal_peft(init, kw):
    mine, pm = ours(init, **kw), theirs(init, **kw)
    mods = dict(pm.base_model.model.named_modules())
    for path, layer in adapted_layers(mine):
        ad, ref = layer.adapters["default"], mods[path]
        torch.testing.assert_close(ad.lora_A, ref.lora_A["default"].weight, atol=1e-5, rtol=0)
        torch.testing.assert_close(ad.lora_B, ref.lora_B["default"].weight, atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.base_layer.weight, ref.base_layer.weight, atol=1e-5,
                                   rtol=0)
    out, ref_out = mine(input_ids=IDS, labels=IDS), pm(input_ids=IDS, labels=IDS)
    torch.testing.assert_close(out.logits, ref_out.logits, atol=1e-5, rtol=0)
    out.loss.backward()
    ref_out.loss.backward()
    for path, layer in adapted_layers(mine):
        ad, ref = layer.adapters["default"], mods[path]
        torch.testing.assert_close(ad.lora_A.grad, ref.lora_A["default"].weight.grad, atol=1e-5,
                                   rtol=0)
        torch.testing.assert_close(ad.lora_B.grad, ref.lora_B["default"].weight.grad, atol=1e-5,
                                   rtol=0)


def test_fresh_base_init_changes_nothing_and_niter_keeps_the_invariant():
    base = logits(tiny_llama())
    for init in ("pissa", "olora", "pissa_niter_4"):
        torch.testing.assert_close(logits(ours(init)), base, atol=1e-5, rtol=0)
    original = tiny_llama().model.layers[0].self_attn.q_proj.weight
    exact, fast = ours("pissa"), ours("pissa_niter_8")
    residuals = []
    for model in (exact, fast):
        layer = model.model.layers[0].self_attn.q_proj
        ad = layer.adapters["default"]
        product = ad.scaling * ad.lora_B @ ad.lora_A
        torch.testing.assert_close(layer.base_layer.weight + product, original, atol=1e-5, rtol=0)
        residuals.append(layer.base_layer.weight.norm().item())
    # the exact SVD leaves the smallest residual (Eckart-Young); 8 iterations come within 1%
    assert residuals[0] <= residuals[1] < 1.01 * residuals[0]
    torch.manual_seed(0)
    a1 = ours("pissa_niter_1").model.layers[0].self_attn.q_proj.adapters["default"].lora_A
    torch.manual_seed(0)
    a2 = ours("pissa_niter_1").model.layers[0].self_attn.q_proj.adapters["default"].lora_A
    assert torch.equal(a1, a2)


@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_2"])
@pytest.mark.parametrize("kw", [{"lora_alpha": 8}, {"lora_alpha": 16, "use_rslora": True}])
def test_our_file_is_a_plain_lora_for_the_unchanged_base(tmp_path, init, kw):
    model = ours(init, **kw)
    perturb(model)
    want = logits(model)
    save_adapter(model, tmp_path / "ad")
    saved = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] is True and saved["r"] == 8
    mine = tiny_llama()
    load_adapter(mine, tmp_path / "ad")
    torch.testing.assert_close(logits(mine), want, atol=1e-5, rtol=0)
    pm = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ad")
    torch.testing.assert_close(logits(pm), want, atol=1e-5, rtol=0)
    # merged into the (changed) base: the same fine-tuned model
    torch.testing.assert_close(logits(merge_and_unload(model)), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_peft_folders_load_in_ours_converted_or_not(tmp_path, init):
    pm = theirs(init, lora_alpha=8)
    pm.save_pretrained(tmp_path / "init")  # PEFT's recipe: the starting adapter, then train
    perturb(pm)
    want = logits(pm)
    pm.save_pretrained(tmp_path / "plain",
                       path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    pm.save_pretrained(tmp_path / "raw")  # init_lora_weights stays: the init runs on load
    for folder in ("plain", "raw"):
        mine = tiny_llama()
        load_adapter(mine, tmp_path / folder)
        torch.testing.assert_close(logits(mine), want, atol=1e-5, rtol=0)
        # and saved again by us it is a plain LoRA for the unchanged base
        save_adapter(mine, tmp_path / f"again_{folder}")
        again = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / f"again_{folder}")
        torch.testing.assert_close(logits(again), want, atol=1e-5, rtol=0)


def test_refusals_name_the_init(tmp_path):
    pm = theirs("pissa_niter_2", lora_alpha=8)
    pm.save_pretrained(tmp_path / "raw")
    with pytest.raises(AdapterError, match=r"adapter_config.json: init_lora_weights is "
                                           r"'pissa_niter_2'.*path_initial_model_for_weight"):
        load_adapter(tiny_llama(), tmp_path / "raw")
    q = tiny_llama()
    quantize_model(q, QuantConfig())
    with pytest.raises(AdapterError, match=r"'pissa' rewrites the base weight.*Linear4bit.*"
                                           r"unquantized"):
        add_adapter(q, LoraConfig(init_lora_weights="pissa", target_modules=["q_proj"]))
    model = ours("olora")
    with pytest.raises(AdapterError, match=r"already changed by another adapter's 'olora'"):
        add_adapter(model, LoraConfig(init_lora_weights="pissa", target_modules=TARGETS), "b")
    with pytest.raises(ValueError, match=r"'olora' is for method lora only, not dora"):
        LoraConfig(method="dora", init_lora_weights="olora")


def test_loftq_base_is_nf4_closer_to_w_and_quantizes_back_exactly():
    torch.manual_seed(0)
    w = torch.randn(64, 48)
    for alpha, iters in ((4, 1), (8, 1), (16, 3)):
        lin = torch.nn.Linear(48, 64, bias=False)
        with torch.no_grad():
            lin.weight.copy_(w)
        model = torch.nn.Sequential(lin)
        add_adapter(model, LoraConfig(r=4, lora_alpha=alpha, init_lora_weights="loftq",
                                      loftq_config={"loftq_iter": iters}, target_modules=["0"]))
        layer = model[0]
        ad, q = layer.adapters["default"], layer.base_layer.weight
        assert torch.equal(nf4_round_trip(q), q)  # NF4 values: quantizing again loses nothing
        err = (w - q - ad.scaling * ad.lora_B @ ad.lora_A).norm()
        qlora_err = (w - nf4_round_trip(w)).norm()
        assert err < 0.93 * qlora_err, (alpha, iters, err, qlora_err)


def test_loftq_on_a_tiny_model_quantizes_saves_and_reloads(tmp_path):
    model = ours("loftq", lora_alpha=8)
    perturb(model)
    want = logits(model)
    # the base holds NF4 values: a 4-bit copy of it (bitsandbytes' layout) runs the same
    quantize_model(model, QuantConfig(double_quant=False),
                   [p + ".base_layer" for p, _ in adapted_layers(model)])
    torch.testing.assert_close(logits(model), want, atol=1e-5, rtol=0)
    save_adapter(model, tmp_path / "ad")
    saved = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "loftq" and saved["loftq_config"]["loftq_iter"] == 1
    mine = tiny_llama()  # the original weights: loading reruns LoftQ, then copies A and B
    load_adapter(mine, tmp_path / "ad")
    torch.testing.assert_close(logits(mine), want, atol=1e-5, rtol=0)


def test_pissa_trains_through_train_and_its_file_reloads(tmp_path, data_file, smol_tokenizer):
    model, result = train_tiny(tmp_path, data_file, smol_tokenizer,
                               {"r": 4, "lora_alpha": 8, "init_lora_weights": "pissa"})
    ids = torch.tensor([[5, 900, 17, 4000, 31]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
        pm = peft.PeftModel.from_pretrained(tiny_llama(vocab=len(smol_tokenizer)),
                                            result.adapter_dir)
        torch.testing.assert_close(pm(input_ids=ids).logits, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("iters", [1, 3])
def test_loftq_equals_peft_loop_with_bitsandbytes_nf4(iters):
    """PEFT's loftq_init asks for CUDA; its loop is rebuilt here from PEFT's own SVD helper and
    bitsandbytes' (CPU) NF4 codes, with lora_alpha = r where PEFT's unscaled B·A is right.
    (bitsandbytes' CPU dequantize_4bit is off by up to 1.2 here without its `kernels` package,
    so its codes are decoded with its own code table and block scales.)"""
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    from peft.utils.loftq_utils import _low_rank_decomposition

    torch.manual_seed(1)
    w = torch.randn(64, 48)
    table = bnb_f.get_4bit_type("nf4", device="cpu")
    residual = w
    for step in range(iters):
        packed, state = bnb_f.quantize_4bit(residual, blocksize=64, compress_statistics=False,
                                            quant_type="nf4")
        codes = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 15], 1).view(-1).long()
        q = (table[codes].view(-1, 64) * state.absmax[:, None]).view(w.shape)
        out = _low_rank_decomposition(w - q, reduced_rank=4)
        residual = w - out["L"] @ out["R"]
    lin = torch.nn.Linear(48, 64, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    model = torch.nn.Sequential(lin)
    add_adapter(model, LoraConfig(r=4, lora_alpha=4, init_lora_weights="loftq",
                                  loftq_config={"loftq_iter": iters}, target_modules=["0"]))
    ad = model[0].adapters["default"]
    torch.testing.assert_close(model[0].base_layer.weight, q, atol=1e-5, rtol=0)
    torch.testing.assert_close(ad.lora_B @ ad.lora_A, out["L"] @ out["R"], atol=1e-5, rtol=0)



def pair_batch():
    ids = torch.tensor([[3, 7, 11, 2, 64, 99], [3, 7, 11, 5, 40, 8]])  # chosen, rejected
    labels = ids.clone()
    labels[:, :3] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def dpo_reference_sums(model):
    """The summed completion log-probs DPO's reference gives (adapters disabled)."""
    from loratune.config import TrainConfig
    from loratune.train.preference_loss import PreferenceLoss, Reference, completion_mask

    batch = pair_batch()
    loss = PreferenceLoss(TrainConfig(objective="dpo"), Reference())
    with torch.no_grad():
        return loss._reference_sums(model, batch, completion_mask(batch), 1024)


@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_2", "loftq"])
def test_disabled_adapters_give_the_model_training_started_from(init):
    """DPO's reference (and GRPO's, train.rl.beta > 0: the same disable_adapters) is the model
    at step 0: for PiSSA/OLoRA the original base, not the residual W' left in the layer; for
    LoftQ (the original W is not kept) its NF4 base plus the fitted error."""
    torch.manual_seed(0)
    model = ours(init)
    start = logits(model)  # step 0, adapter on
    if init != "loftq":
        torch.testing.assert_close(start, logits(tiny_llama()), atol=1e-5, rtol=0)
    want = dpo_reference_sums(tiny_llama())  # the plain base's (no adapter to disable)
    if init == "loftq":  # the policy's own at step 0
        from loratune.train.preference_loss import completion_mask, row_sums
        with torch.no_grad():
            want = row_sums(model, pair_batch(), completion_mask(pair_batch()), 1024)
    perturb(model)  # trained: the policy moves, the reference must not
    assert (logits(model) - start).abs().max() > 1e-2
    with disable_adapters(model):
        torch.testing.assert_close(logits(model), start, atol=1e-5, rtol=0)
    torch.testing.assert_close(dpo_reference_sums(model), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora", "loftq"])
def test_streaming_merge_onto_the_original_base_is_the_trained_model(tmp_path, init):
    """`loratune merge` reads the file and the ORIGINAL base folder (PEFT's convention after
    path_initial_model_for_weight_conversion): the result is the model that was trained."""
    from transformers import AutoModelForCausalLM

    from loratune.export.merge import merge_folder, read_adapters

    tiny_llama().save_pretrained(tmp_path / "base")
    model = ours(init)
    perturb(model)
    want = logits(model)
    save_adapter(model, tmp_path / "ad")
    merge_folder(tmp_path / "base", read_adapters([tmp_path / "ad"], None), tmp_path / "out")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(logits(merged), want, atol=1e-5, rtol=0)
