"""4-bit checkpoints in transformers + bitsandbytes' `load_in_4bit` layout, both ways."""

import json

import pytest
import torch

from loratune.config import ModelConfig, QuantConfig
from loratune.models import load_model
from loratune.quant.io import save_quantized
from loratune.quant.linear4bit import Linear4bit
from loratune.quant.load import load_quantized
from loratune.quant.model import prepare_for_kbit_training, quantize_model
from tiny import tiny_llama

pytest.importorskip("bitsandbytes")
IDS = torch.tensor([[5, 9, 3, 77, 21, 8, 100, 64]])


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _bnb_model(folder):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    return AutoModelForCausalLM.from_pretrained(
        folder, device_map="cpu", quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32))


def _with_tokenizer(folder):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, "<unk>")),
                            eos_token="<unk>").save_pretrained(folder)


def test_a_bitsandbytes_checkpoint_loads_with_equal_logits(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "fp32")
    theirs = _bnb_model(tmp_path / "fp32")
    theirs.save_pretrained(tmp_path / "bnb4")
    _with_tokenizer(tmp_path / "bnb4")
    ours, _ = load_model(ModelConfig(name=str(tmp_path / "bnb4"), attn_implementation="eager"))
    assert sum(isinstance(m, Linear4bit) for m in ours.modules()) == 14
    torch.testing.assert_close(_logits(ours), _logits(theirs.eval()), atol=1e-5, rtol=1e-5)


def test_our_checkpoint_loads_in_transformers_and_back(tmp_path):
    model = tiny_llama()
    quantize_model(model, QuantConfig())
    prepare_for_kbit_training(model)
    save_quantized(model, tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cpu").eval()
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
