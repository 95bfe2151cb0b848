"""`loratune merge` of an adapter that adds tokens: the merged folder has the grown embeddings,
vocab_size and the adapter's tokenizer, and gives the trained model's logits."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loratune.adapters.registry import AdapterError
from loratune.config import build_config
from loratune.export.merge import merge_folder, read_adapters
from loratune.models import load_tokenizer
from loratune.train import train
from tiny import tiny_llama


def _train(tmp_path, name, tokens):
    tok = load_tokenizer("smollm2-135m-instruct")
    path = tmp_path / f"{name}.jsonl"
    rows = [{"instruction": f"Dose for {w}?", "output": f"{tokens[0]} {w} 2"}
            for w in ["aspirin", "codeine", "insulin", "ibuprofen"]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = tiny_llama(vocab=len(tok))
    cfg = build_config({
        "output_dir": str(tmp_path / name),
        "adapter": {"r": 4, "lora_alpha": 8, "modules_to_save": ["embed_tokens", "lm_head"]},
        "data": {"train": str(path), "max_length": 64, "add_tokens": tokens},
        "train": {"max_steps": 3, "batch_size": 2, "lr": 1e-2, "warmup_ratio": 0.0}})
    return train(cfg, model=model, tokenizer=tok, quiet=True), model.eval(), tok


@pytest.fixture
def base_dir(tmp_path):
    tok = load_tokenizer("smollm2-135m-instruct")
    folder = tmp_path / "base"
    tiny_llama(vocab=len(tok)).save_pretrained(folder)   # the base the runs start from
    tok.save_pretrained(folder)
    return folder


def test_merged_folder_carries_the_new_tokens(tmp_path, base_dir):
    result, model, tok = _train(tmp_path, "run", ["<rx>", "<|dose|>"])
    out = tmp_path / "merged"
    merge_folder(base_dir, read_adapters([result.adapter_dir], None), out)
    merged_tok = AutoTokenizer.from_pretrained(out)
    assert len(merged_tok) == len(tok) and merged_tok.convert_tokens_to_ids("<rx>") == len(tok) - 2
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.config.vocab_size == len(tok)
    ids = torch.tensor([merged_tok("take <rx> aspirin <|dose|>")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, model(input_ids=ids).logits,
                                   atol=1e-5, rtol=0)


def test_adapters_adding_different_tokens_are_refused(tmp_path, base_dir):
    a, _, _ = _train(tmp_path, "a", ["<rx>"])
    b, _, _ = _train(tmp_path, "b", ["<dx>"])
    with pytest.raises(AdapterError, match="the adapters add different new tokens .*<rx>.*<dx>"):
        merge_folder(base_dir, read_adapters([a.adapter_dir, b.adapter_dir], None),
                     tmp_path / "m")


def test_merged_gguf_has_the_new_tokens_and_rows(tmp_path, base_dir):
    gguf = pytest.importorskip("gguf")
    from loratune.export.gguf_file import write_gguf

    result, model, tok = _train(tmp_path, "run", ["<rx>", "<|dose|>"])
    merged = merge_folder(base_dir, read_adapters([result.adapter_dir], None),
                          tmp_path / "merged").out
    out = write_gguf(merged, tmp_path / "m.gguf", "f32")
    reader = gguf.GGUFReader(str(out))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == len(tok) and tokens[len(tok) - 2:] == ["<rx>", "<|dose|>"]
    (embd,) = [t for t in reader.tensors if t.name == "token_embd.weight"]
    rows = torch.from_numpy(embd.data.copy()).reshape(-1, model.config.hidden_size)
    torch.testing.assert_close(rows[-2:], model.get_input_embeddings().weight[-2:].detach())


def test_adapter_gguf_refuses_new_tokens_by_name(tmp_path, base_dir):
    from loratune.export.gguf_arch import GGUFExportError
    from loratune.export.gguf_file import write_lora_gguf

    result, _, _ = _train(tmp_path, "run", ["<rx>"])
    with pytest.raises(GGUFExportError, match=r"adds tokens \(<rx>\), which llama.cpp's adapter "
                       "file cannot carry.*export gguf --adapter DIR"):
        write_lora_gguf(result.adapter_dir, base_dir, tmp_path / "a.gguf")
