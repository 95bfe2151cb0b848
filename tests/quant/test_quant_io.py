"""4-bit checkpoints in transformers + bitsandbytes' `load_in_4bit` layout, both ways."""

import json

import pytest
import torch

from loratune.config import ModelConfig, QuantConfig
from loratune.models import load_model
from loratune.models.load_4bit import load_quantized
from loratune.models.quantize import prepare_for_kbit_training, quantize_model
from loratune.quant.io import save_quantized
from loratune.quant.linear4bit import Linear4bit
from tiny import tiny_llama

pytest.importorskip("bitsandbytes")
IDS = torch.tensor([[5, 9, 3, 77, 21, 8, 100, 64]])


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _bnb_cpu_dequant_fault(shape=(32, 32)) -> str | None:
    """Why bitsandbytes' own 4-bit dequantization is unusable as an oracle here, or None.

    Its bytes are decoded by the stored format (a 4-bit code per nibble, high nibble first,
    times the block's double-quantized absmax) and compared with its dequantize_4bit. Seen
    broken: bitsandbytes 0.50.2 on an AVX-512-bf16 CPU with 32-wide rows (0.018 off)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02
    packed, state = F.quantize_4bit(x, blocksize=64, compress_statistics=True, quant_type="nf4")
    absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    codes = packed.view(torch.uint8).flatten()
    nibbles = torch.stack([codes >> 4, codes & 15], 1).flatten().long()[:x.numel()]
    decoded = (state.code[nibbles].view(-1, 64) * absmax[:, None]).view(shape)
    off = (F.dequantize_4bit(packed, state) - decoded).abs().max().item()
    if off > 1e-6:
        return (f"bitsandbytes {bnb.__version__}'s CPU dequantize_4bit disagrees with its own "
                f"stored format by {off:.3g} on a {shape[0]}x{shape[1]} weight on this CPU")
    return None


def _bnb_reference_kernel(model):
    """bitsandbytes >= 0.49 repacks 4-bit weights for an AVX-512-bf16 CPU kernel at the first
    inference forward: absmax rounded to bf16 (not the stored values), and a crash for layers
    narrower than one block (in_features 32 < 64 here). The oracle is its plain dequantizing
    path; its own switch selects it."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def _bnb_model(folder):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    return _bnb_reference_kernel(AutoModelForCausalLM.from_pretrained(
        folder, device_map="cpu", quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)))


def _with_tokenizer(folder):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, "<unk>")),
                            eos_token="<unk>").save_pretrained(folder)


def test_a_bitsandbytes_checkpoint_loads_with_equal_logits(tmp_path):
    if fault := _bnb_cpu_dequant_fault():
        pytest.skip(fault)
    tiny_llama().save_pretrained(tmp_path / "fp32")
    theirs = _bnb_model(tmp_path / "fp32")
    theirs.save_pretrained(tmp_path / "bnb4")
    _with_tokenizer(tmp_path / "bnb4")
    ours, _ = load_model(ModelConfig(name=str(tmp_path / "bnb4"), attn_implementation="eager"))
    assert sum(isinstance(m, Linear4bit) for m in ours.modules()) == 14
    torch.testing.assert_close(_logits(ours), _logits(theirs.eval()), atol=1e-5, rtol=1e-5)


def test_our_checkpoint_loads_in_transformers_and_back(tmp_path):
    if fault := _bnb_cpu_dequant_fault():
        pytest.skip(fault)
    model = tiny_llama()
    quantize_model(model, QuantConfig())
    prepare_for_kbit_training(model)
    save_quantized(model, tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cpu").eval()
    _bnb_reference_kernel(theirs)
    torch.testing.assert_close(_logits(theirs), _logits(model), atol=1e-5, rtol=1e-5)
    again = load_quantized(tmp_path / "q", QuantConfig())
    again.config._attn_implementation = "eager"
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    with pytest.raises(FileExistsError):
        save_quantized(model, tmp_path / "q")  # nothing is overwritten silently


def test_checkpoint_of_another_shape_is_refused_by_name(tmp_path):
    model = tiny_llama()
    quantize_model(model, QuantConfig())
    save_quantized(model, tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    cfg["intermediate_size"] = 96  # claims another MLP width than the stored weights
    (tmp_path / "q" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.down_proj: the 4-bit checkpoint "
                                         r"holds a 32x64 weight but the model expects 32x96"):
        load_quantized(tmp_path / "q", QuantConfig())
