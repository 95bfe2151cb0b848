"""train.fused_lora: the fused base+LoRA op against the plain path (fp32: loss, output and
every adapter gradient equal to 1e-6), what it keeps for backward, and where it steps aside."""

import pytest
import torch
from torch import nn

from loratune.adapters import AdaptedLinear, add_adapter
from loratune.adapters.host import adapted_layers
from loratune.adapters.fused_lora import FusedLoraLinear, set_fused_lora
from loratune.config import LoraConfig, QuantConfig
from loratune.quant.linear4bit import Linear4bit
from loratune.train.loop import set_checkpointing
from loratune.train.offload import saved_activation_bytes
from tiny import randomize_lora, tiny_llama


def _layer(base: nn.Module, dropout: float = 0.0, seed: int = 0) -> AdaptedLinear:
    from loratune.adapters.lora import LoraAdapter

    torch.manual_seed(seed)
    base.requires_grad_(False)
    layer = AdaptedLinear(base)
    ad = LoraAdapter(base.in_features, base.out_features,
                     LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout))
    with torch.no_grad():
        ad.lora_B.normal_(0, 0.3)
    layer.adapters["default"] = ad
    layer.active["default"] = 1.0
    return layer.train()


def _run(layer: AdaptedLinear, x: torch.Tensor, fused: bool, seed: int = 5):
    layer.fused = fused
    ad = layer.adapters["default"]
    ad.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)  # the dropout draw
    out = layer(x)
    out.pow(2).mean().backward()
    return out.detach(), x.grad, ad.lora_A.grad, ad.lora_B.grad, out.grad_fn


def _assert_same(a, b, atol=1e-6):
    for i, (u, v) in enumerate(zip(a[:4], b[:4])):
        torch.testing.assert_close(u, v, atol=atol, rtol=0, msg=f"item {i}")


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_equals_plain_on_a_linear_base(dropout, bias):
    layer = _layer(nn.Linear(24, 40, bias=bias), dropout)
    x = torch.randn(3, 5, 24)
    plain, fused = _run(layer, x, False), _run(layer, x, True)
    assert isinstance(fused[4], FusedLoraLinear._backward_cls), "fused op not used"
    assert not isinstance(plain[4], FusedLoraLinear._backward_cls)
    _assert_same(fused, plain)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_fused_equals_plain_on_a_4bit_base_and_keeps_no_weight(dropout):
    base = Linear4bit.from_linear(nn.Linear(64, 96, bias=False), blocksize=64)
    layer = _layer(base, dropout)
    x = torch.randn(2, 7, 64)
    plain, fused = _run(layer, x, False), _run(layer, x, True)
    _assert_same(fused, plain, atol=2e-6)
    # Kept for backward: x, h = A·x [tokens, r], A, B and (with dropout) a boolean mask; no
    # [96, 64] weight (the 4-bit base is dequantized again in backward).
    layer.fused = True
    out = layer(x.requires_grad_(True))
    saved = out.grad_fn.saved_tensors
    shapes = sorted(tuple(t.shape) for t in saved)
    want = sorted([(2, 7, 64), (14, 4), (4, 64), (96, 4)] + ([(14, 64)] if dropout else []))
    assert shapes == want
    if dropout:
        assert [t.dtype for t in saved if tuple(t.shape) == (14, 64)] == [torch.bool]


def test_fused_keeps_less_for_backward_with_dropout():
    cfg = LoraConfig(r=4, lora_dropout=0.1)
    model = tiny_llama()
    add_adapter(model, cfg, "default")
    model.train()
    ids = torch.randint(0, 128, (2, 24))
    sizes = {}
    for fused in (False, True):
        set_fused_lora(model, fused)
        sizes[fused], _ = saved_activation_bytes(lambda: model(ids).logits)
    # Each of the 7 projections per layer kept its own dropped-out fp32 copy of its input;
    # fused keeps a boolean mask instead (measured 2.0x less here).
    assert sizes[True] < 0.7 * sizes[False], sizes


def _model_grads(fused: bool, dropout: float, checkpointing: bool, quantize: bool = False):
    model = tiny_llama()
    if quantize:
        from loratune.models.quantize import prepare_for_kbit_training, quantize_model

        quantize_model(model, QuantConfig())
        prepare_for_kbit_training(model)
    torch.manual_seed(0)
    add_adapter(model, LoraConfig(r=4, lora_alpha=16, lora_dropout=dropout), "default")
    randomize_lora(model)
    assert set_fused_lora(model, fused) == 14  # 7 projections x 2 layers
    if checkpointing:
        set_checkpointing(model, True)
    model.train()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 128, (2, 16), generator=g)
    torch.manual_seed(9)
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads


@pytest.mark.parametrize("dropout,checkpointing,quantize", [
    (0.0, False, False), (0.1, False, False), (0.1, True, False), (0.0, False, True)])
def test_model_loss_and_adapter_gradients_equal_the_plain_path(dropout, checkpointing, quantize):
    loss_p, grads_p = _model_grads(False, dropout, checkpointing, quantize)
    loss_f, grads_f = _model_grads(True, dropout, checkpointing, quantize)
    assert loss_f == pytest.approx(loss_p, abs=1e-6)
    assert grads_f.keys() == grads_p.keys() and len(grads_f) == 28
    for k in grads_p:
        torch.testing.assert_close(grads_f[k], grads_p[k], atol=1e-6, rtol=1e-5, msg=k)


def test_bf16_base_with_fp32_adapter_matches_the_plain_path():
    base = nn.Linear(32, 48).to(torch.bfloat16)
    layer = _layer(base, 0.0)  # adapter fp32, base bf16: the adapter casts at the boundary
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    plain, fused = _run(layer, x, False), _run(layer, x, True)
    assert fused[0].dtype == torch.bfloat16 and fused[2].dtype == torch.float32
    _assert_same(fused, plain, atol=2e-2)


def test_other_methods_and_several_adapters_take_the_plain_path():
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=2, use_dora=True), "default")
    set_fused_lora(model, True)
    out = model.model.layers[0].self_attn.q_proj(torch.randn(1, 3, 32))
    assert not isinstance(out.grad_fn, FusedLoraLinear._backward_cls)

    layer = _layer(nn.Linear(8, 8))
    second = _layer(nn.Linear(8, 8), seed=1).adapters["default"]
    layer.adapters["other"] = second
    layer.active["other"] = 0.5
    layer.fused = True
    out = layer(torch.randn(2, 8, requires_grad=True))
    assert not isinstance(out.grad_fn, FusedLoraLinear._backward_cls)
    layer.active.pop("other")
    assert isinstance(layer(torch.randn(2, 8, requires_grad=True)).grad_fn,
                      FusedLoraLinear._backward_cls)


def test_a_trained_base_weight_is_not_fused():
    layer = _layer(nn.Linear(8, 8))
    layer.base_layer.weight.requires_grad_(True)  # full fine-tuning of the base: plain path
    layer.fused = True
    out = layer(torch.randn(2, 8))
    assert not isinstance(out.grad_fn, FusedLoraLinear._backward_cls)


def test_train_fused_lora_switch_trains_the_same_adapter(tmp_path, data_file, smol_tokenizer):
    from loratune.config import build_config
    from loratune.train import train

    adapters = {}
    for fused in (False, True):
        cfg = build_config({"output_dir": str(tmp_path / str(fused)),
                            "adapter": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1},
                            "data": {"train": str(data_file), "max_length": 48},
                            "train": {"max_steps": 3, "batch_size": 2, "lr": 5e-3,
                                      "fused_lora": fused}})
        model = tiny_llama(vocab=len(smol_tokenizer))
        result = train(cfg, model=model, tokenizer=smol_tokenizer, quiet=True)
        assert all(layer.fused is fused for _, layer in adapted_layers(model))
        adapters[fused] = ([h["loss"] for h in result.history],
                           {n: p.detach().clone() for n, p in model.named_parameters()
                            if p.requires_grad})
    assert adapters[True][0] == pytest.approx(adapters[False][0], abs=1e-5)
    for k, v in adapters[False][1].items():
        torch.testing.assert_close(adapters[True][1][k], v, atol=1e-5, rtol=0, msg=k)
    assert max(float(v.abs().max()) for k, v in adapters[True][1].items() if "lora_B" in k) > 1e-3
