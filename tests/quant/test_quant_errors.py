"""Bad input around quantization, devices and dtypes: clear errors, warned fallbacks."""

import warnings

import pytest
import torch

from loratune.config import ConfigError, QuantConfig, build_config
from loratune.models import device as dev_mod
from loratune.models.device import DtypeFallbackWarning, resolve_dtype
from loratune.models.quantize import quantize_model
from loratune.quant.linear4bit import Linear4bit
from loratune.quant.nf4 import quantize_4bit
from loratune.train.offload import HostOffload, activation_offload, offload_notes
from loratune.config import TrainConfig
from tiny import tiny_llama


@pytest.mark.parametrize("blocksize", [48, 100, 16, 8192])
def test_blocksize_must_be_power_of_two_in_range(blocksize):
    with pytest.raises(ValueError, match=f"blocksize {blocksize}: expected a power of two"):
        quantize_4bit(torch.randn(256), blocksize)
    with pytest.raises(ConfigError, match="model.quantization.blocksize"):
        build_config({"model": {"quantization": {"blocksize": blocksize}}})


def test_quantizing_a_non_linear_names_the_module():
    model = tiny_llama()
    with pytest.raises(ValueError, match="'model.layers.0.input_layernorm'.*LlamaRMSNorm"):
        quantize_model(model, QuantConfig(), ["model.layers.0.self_attn.q_proj",
                                              "model.layers.0.input_layernorm"])
    # nothing was replaced before the check failed
    assert not any(isinstance(m, Linear4bit) for m in model.modules())
    with pytest.raises(ValueError, match="'model.nope'.*no such module"):
        quantize_model(model, QuantConfig(), ["model.nope"])


def test_odd_sized_linear_quantizes_with_a_short_last_block():
    lin = torch.nn.Linear(37, 5)  # 185 values: not a multiple of the block size
    q = Linear4bit.from_linear(lin)
    x = torch.randn(3, 37)
    torch.testing.assert_close(q(x), x @ q.dequantize().T + lin.bias)
    assert (q.dequantize() - lin.weight).abs().max() < 0.2 * lin.weight.abs().max()


def test_bf16_without_native_support_falls_back_with_a_warning(monkeypatch):
    monkeypatch.setattr(dev_mod, "native_support", lambda d, t: t == torch.float32)
    with pytest.warns(DtypeFallbackWarning, match="model.dtype: bfloat16 is not supported"):
        assert resolve_dtype("bfloat16", "cpu") == torch.float32
    with pytest.raises(ValueError, match="strict_dtype"):
        resolve_dtype("bfloat16", "cpu", strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_dtype("float32", "cpu") == torch.float32


def test_supported_dtype_is_kept(monkeypatch):
    monkeypatch.setattr(dev_mod, "native_support", lambda d, t: True)
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_requested_without_a_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="model.device: 'cuda' requested but"):
        resolve_dtype("float32", "cuda")


def test_offload_options_are_no_ops_on_cpu_and_say_so():
    cfg = TrainConfig(offload_activations=True, offload_optimizer=True)
    notes = offload_notes(cfg, torch.device("cpu"))
    assert len(notes) == 2 and all("no-op on CPU" in n for n in notes)
    assert offload_notes(TrainConfig(), torch.device("cpu")) == []
    assert not isinstance(activation_offload(True, torch.device("cpu")),
                          torch.autograd.graph.save_on_cpu)
    ctx = activation_offload(True, torch.device("cuda"))
    assert isinstance(ctx, HostOffload)


def test_offload_activations_keeps_host_copies_of_saved_tensors():
    """loratune's accelerator path, run on CPU tensors (pinning needs CUDA; without it the pack
    hook still copies): what backward keeps is the hook's host copy, and gradients are equal."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 16)
    x = torch.randn(1024, 16)  # 64 KiB: smaller saved tensors stay where they are
    lin(x).pow(2).sum().backward()
    ref = lin.weight.grad.clone()
    for device, copied in (("cpu", False), ("cuda", True)):
        lin.weight.grad = None
        with activation_offload(True, torch.device(device)):
            h = lin(x)
            y = (h * h).sum()
        saved = y.grad_fn.next_functions[0][0]._saved_self  # h, as kept by MulBackward
        assert saved.device.type == "cpu"
        assert (saved.data_ptr() != h.data_ptr()) is copied, device
        y.backward()
        torch.testing.assert_close(lin.weight.grad, ref)


def test_training_forwards_run_under_activation_offload(tmp_path, monkeypatch, smol_tokenizer):
    import json

    from loratune.train import loop, train

    real, calls = loop.activation_offload, []

    def spy(enabled, device, model=None):
        calls.append((enabled, device.type, type(model).__name__))
        return real(enabled, device, model)

    monkeypatch.setattr(loop, "activation_offload", spy)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"say {w}", "output": w}) + "\n"
                            for w in "abcd"))
    cfg = build_config({"output_dir": str(tmp_path / "run"),
                        "adapter": {"r": 2, "target_modules": ["q_proj"]},
                        "data": {"train": str(data)},
                        "train": {"max_steps": 2, "batch_size": 1, "grad_accum": 2,
                                  "offload_activations": True}})
    train(cfg, model=tiny_llama(vocab=len(smol_tokenizer)), tokenizer=smol_tokenizer, quiet=True)
    assert calls == [(True, "cpu", "LlamaForCausalLM")] * 4  # every micro-batch's forward, with the option's value
