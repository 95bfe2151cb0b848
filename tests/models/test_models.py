import json

import pytest
import torch

from loratune.config import ModelConfig
from loratune.models import ModelNotFound, load_model, resolve_model
from loratune.models.modules import select_targets
from tiny import tiny_llama


def test_unknown_model_lists_what_was_looked_for():
    with pytest.raises(ModelNotFound) as err:
        resolve_model("no-such-model")
    text = str(err.value)
    assert "smollm2-135m-instruct" in text and "config.json" in text and ".gguf" in text


def test_pickle_only_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFound, match="pickle files are refused"):
        resolve_model(str(tmp_path))


def test_hf_folder_loads_with_dtype(tmp_path, monkeypatch):
    from loratune.models import device

    monkeypatch.setattr(device, "native_support", lambda d, t: True)  # this CPU may lack bf16
    model = tiny_llama()
    model.save_pretrained(tmp_path)
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, "<unk>")),
                                  eos_token="<unk>")
    tok.save_pretrained(tmp_path)
    loaded, _ = load_model(ModelConfig(name=str(tmp_path), dtype="bfloat16"))
    assert loaded.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in loaded.parameters())


def test_all_linear_skips_lm_head():
    model = tiny_llama()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    chosen = select_targets(model, "all-linear", names)
    assert "lm_head" in names and "lm_head" not in chosen and len(chosen) == len(names) - 1


@pytest.mark.slow
def test_embedded_model_loads_and_answers():
    from loratune.eval.generate import generate_chat

    model, tok = load_model("smollm2-135m-instruct")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.hidden_size == 576
    answer = generate_chat(model, tok, [[{"role": "user", "content": "What is the capital of France?"}]],
                           max_new_tokens=12)[0]
    assert "Paris" in answer


@pytest.mark.slow
def test_gguf_file_loads_like_the_cache():
    """A .gguf path is dequantized by transformers + gguf: same weights as the embedded cache."""
    from loratune.models.load import EMBEDDED, _embedded_gguf

    gguf = _embedded_gguf(EMBEDDED["smollm2-135m-instruct"])
    from_gguf, tok = load_model(str(gguf))
    cached, _ = load_model("smollm2-135m-instruct")
    ids = tok("Hello there", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(from_gguf(input_ids=ids).logits, cached(input_ids=ids).logits)
