"""QLoRA: LoRA on a frozen 4-bit base."""

import pytest
import torch
from torch import nn

from loratune.adapters import add_adapter, load_adapter, merge, save_adapter, trainable_report
from loratune.config import LoraConfig, QuantConfig
from loratune.models.quantize import prepare_for_kbit_training, quantize_model, quantized_bytes
from loratune.quant.linear4bit import Linear4bit
from tiny import randomize_lora, tiny_llama

IDS = torch.tensor([[5, 9, 3, 77, 21, 8, 100, 64]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_linear4bit_forward_backward_use_dequantized_weight_only():
    torch.manual_seed(0)
    lin = nn.Linear(64, 96, bias=True)
    lin.weight.data.normal_(0, 0.02)  # NF4 is built for normally distributed weights
    q = Linear4bit.from_linear(lin)
    w = q.dequantize()
    x = torch.randn(5, 64, requires_grad=True)
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t,
                                                  lambda t: t):
        y = q(x)
    torch.testing.assert_close(y, x @ w.T + lin.bias, atol=1e-5, rtol=1e-5)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(5, 96) @ w, atol=1e-5, rtol=1e-5)
    assert (96, 64) not in shapes  # no full-precision weight kept for backward
    assert not any(p.requires_grad for p in q.parameters())
    assert (w - lin.weight).abs().mean() < 0.1 * lin.weight.abs().mean()


def _quantized_tiny():
    model = tiny_llama()
    reference = tiny_llama()
    quantize_model(model, QuantConfig())
    prepare_for_kbit_training(model)
    # The reference holds the same dequantized weights in plain nn.Linear layers.
    for name, mod in model.named_modules():
        if isinstance(mod, Linear4bit):
            reference.get_submodule(name).weight.data.copy_(mod.dequantize())
    return model, reference


def test_qlora_equals_lora_on_dequantized_base(tmp_path):
    model, reference = _quantized_tiny()
    assert isinstance(model.model.layers[0].mlp.up_proj, Linear4bit)
    assert isinstance(model.lm_head, nn.Linear)  # the output layer stays in full precision
    torch.testing.assert_close(logits(model), logits(reference), atol=1e-5, rtol=1e-5)
    cfg = LoraConfig(r=4, lora_alpha=8)
    torch.manual_seed(1)
    add_adapter(model, cfg)
    torch.manual_seed(1)
    add_adapter(reference, cfg)
    randomize_lora(model)
    randomize_lora(reference)
    torch.testing.assert_close(logits(model), logits(reference), atol=1e-5, rtol=1e-5)
    # the report counts a 4-bit weight as the parameters it stands for
    assert trainable_report(model)[:2] == trainable_report(reference)[:2]
    # Adapter files do not depend on the base's storage: load into the fp32 reference.
    save_adapter(model, tmp_path / "ad")
    fresh = _quantized_tiny()[1]
    load_adapter(fresh, tmp_path / "ad")
    torch.testing.assert_close(logits(fresh), logits(model), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cannot merge into a Linear4bit"):
        merge(model)


def test_qlora_training_lowers_loss_and_base_stays_frozen():
    model, _ = _quantized_tiny()
    add_adapter(model, LoraConfig(r=8, lora_alpha=16))
    packed_before = model.model.layers[0].self_attn.q_proj.base_layer.packed.clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    assert torch.equal(model.model.layers[0].self_attn.q_proj.base_layer.packed, packed_before)


def test_quantized_size_is_about_4_bits_per_weight():
    model = tiny_llama()
    n = sum(m.weight.numel() for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name != "lm_head")
    quantize_model(model, QuantConfig())
    assert 4.0 <= quantized_bytes(model) * 8 / n <= 4.6


def test_streaming_load_equals_quantize_after_load(tmp_path):
    from loratune.models.load_4bit import load_quantized

    model = tiny_llama(bias=True)
    model.save_pretrained(tmp_path)
    streamed = load_quantized(tmp_path, QuantConfig())
    quantize_model(model, QuantConfig())
    assert isinstance(streamed.model.layers[1].self_attn.o_proj, Linear4bit)
    assert streamed.model.layers[0].self_attn.q_proj.bias is not None
    torch.testing.assert_close(logits(streamed), logits(model), atol=1e-6, rtol=1e-6)


def test_random_model_of_a_shape_is_built_in_4bit():
    from loratune.models.load_4bit import random_quantized

    dims = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, vocab_size=256)
    model = random_quantized(dims, QuantConfig())
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) == 2 * 7
    assert not any(t.is_meta for t in model.state_dict().values() if t is not None)
    out = logits(model)
    assert torch.isfinite(out).all() and out.shape == (1, 8, 256)


@pytest.mark.slow
def test_embedded_model_in_4bit_answers():
    from loratune.config import ModelConfig
    from loratune.eval.generate import generate_chat
    from loratune.models import load_model

    model, tok = load_model(ModelConfig(quantization=QuantConfig()))
    assert isinstance(model.model.layers[0].mlp.down_proj, Linear4bit)
    answer = generate_chat(model, tok, [[{"role": "user",
                                          "content": "What is the capital of France?"}]],
                           max_new_tokens=12)[0]
    assert "Paris" in answer


def _resident_bytes(model) -> int:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()] if t is not None}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _unquantized(model) -> list[torch.Tensor]:
    return list(model.parameters())  # 4-bit weights are buffers


@pytest.mark.parametrize("build", ["streamed", "in_memory"])
def test_compute_dtype_bf16_runs_and_stores_the_model_in_bf16(tmp_path, build):
    """compute_dtype: bfloat16 holds end to end: embeddings, norms, lm_head, biases stored in
    bf16; hidden states, every projection's output, the final norm and the logits in bf16."""
    from loratune.models.load_4bit import load_quantized
    from loratune.models.quantize import unquantized_dtype

    def build_model(**options):
        cfg = QuantConfig(compute_dtype="bfloat16", **options)
        if build == "streamed":
            return load_quantized(tmp_path, cfg)
        model = tiny_llama(bias=True)
        quantize_model(model, cfg)
        return prepare_for_kbit_training(model, unquantized_dtype(cfg))

    tiny_llama(bias=True).save_pretrained(tmp_path)
    model = build_model()
    assert {p.dtype for p in _unquantized(model)} == {torch.bfloat16}
    outputs = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: outputs.__setitem__(n, o.dtype))
             for n, m in model.named_modules() if isinstance(m, Linear4bit) or n == "model.norm"]
    with torch.no_grad():
        out = model(input_ids=IDS, output_hidden_states=True)
    for h in hooks:
        h.remove()
    assert len(outputs) == 15 and set(outputs.values()) == {torch.bfloat16}, outputs
    assert {h.dtype for h in out.hidden_states} == {torch.bfloat16}
    assert out.logits.dtype == torch.bfloat16
    # Resident bytes: the same 4-bit bytes, the unquantized weights at 2 bytes instead of 4.
    wide = build_model(unquantized_dtype="float32")
    assert {p.dtype for p in _unquantized(wide)} == {torch.float32}
    n_plain = sum(p.numel() for p in _unquantized(model))
    assert quantized_bytes(model) == quantized_bytes(wide)
    assert _resident_bytes(wide) - _resident_bytes(model) == 2 * n_plain
    # unquantized_dtype: float32 keeps PEFT's layout: fp32 residual stream, bf16 matmuls
    with torch.no_grad():
        assert wide(input_ids=IDS).logits.dtype == torch.float32
    # The two agree to bf16's resolution
    torch.testing.assert_close(out.logits.float(), logits(wide), atol=0.05, rtol=0.05)


def test_qlora_trains_with_bf16_compute_and_fp32_adapters():
    from loratune.train.loss import causal_lm_loss

    model = tiny_llama()
    quantize_model(model, QuantConfig(compute_dtype="bfloat16"))
    prepare_for_kbit_training(model, torch.bfloat16)
    add_adapter(model, LoraConfig(r=4, lora_alpha=8))
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and {p.dtype for p in params} == {torch.float32}
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-3)
    batch = {"input_ids": IDS, "labels": IDS}
    for _ in range(3):
        loss, n = causal_lm_loss(model, batch)
        (loss / n).backward()
        opt.step()
        opt.zero_grad()
    assert all((p != b).float().mean() > 0.9 for p, b in zip(params, before))
