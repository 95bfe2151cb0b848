"""New tokens (data/new_tokens.py): tokenizer and embeddings grown, rows initialised, trained
through modules_to_save, saved so that PEFT loads the folder with the same logits."""

import json

import pytest
import torch
from safetensors.torch import load_file

from loratune.config import DataConfig, build_config
from loratune.data import DataError
from loratune.data.new_tokens import add_new_tokens, new_tokens_of
from loratune.models import load_tokenizer
from loratune.train import train
from tiny import tiny_llama

NEW = {"add_tokens": ["<rx>"], "add_special_tokens": ["<|dose|>"],
       "new_token_init": {"<rx>": "prescription"}}


@pytest.fixture
def tok():
    return load_tokenizer("smollm2-135m-instruct")  # its own copy: tokens are added to it


def test_rows_start_as_the_mean_or_from_text(tok):
    model = tiny_llama(vocab=len(tok))
    before = model.get_input_embeddings().weight.detach().clone()
    head = model.get_output_embeddings().weight.detach().clone()
    text_ids = tok("prescription", add_special_tokens=False)["input_ids"]
    rx, dose = add_new_tokens(model, tok, DataConfig(**NEW))
    assert (rx, dose) == (len(before), len(before) + 1) and len(tok) == len(before) + 2
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == len(before) + 2
    torch.testing.assert_close(emb[rx], before[text_ids].mean(0))
    torch.testing.assert_close(emb[dose], before.mean(0))
    torch.testing.assert_close(emb[: len(before)], before)
    torch.testing.assert_close(model.get_output_embeddings().weight[dose], head.mean(0))
    assert tok("take <rx> now", add_special_tokens=False)["input_ids"].count(rx) == 1
    with pytest.raises(DataError, match=r"\['<rx>'\] already in the tokenizer"):
        add_new_tokens(model, tok, DataConfig(add_tokens=["<rx>"]))


def _cfg(tmp_path, modules):
    rows = [{"instruction": f"Dose for {w}?", "output": f"<rx> {w} <|dose|> 2"}
            for w in ["aspirin", "ibuprofen", "codeine", "insulin"]]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return build_config({
        "output_dir": str(tmp_path / "run"),
        "adapter": {"r": 4, "lora_alpha": 8, "modules_to_save": modules},
        "data": {"train": str(path), "max_length": 64, **NEW},
        "train": {"max_steps": 4, "batch_size": 2, "lr": 1e-2, "warmup_ratio": 0.0}})


def test_trained_rows_load_in_peft_with_equal_logits(tmp_path, tok):
    peft = pytest.importorskip("peft")
    from transformers import AutoTokenizer

    model = tiny_llama(vocab=len(tok))
    start = model.get_input_embeddings().weight.detach().clone()
    result = train(_cfg(tmp_path, ["embed_tokens", "lm_head"]), model=model, tokenizer=tok,
                   quiet=True)
    folder = result.adapter_dir
    theirs_tok = AutoTokenizer.from_pretrained(folder)
    rx, dose = theirs_tok.convert_tokens_to_ids(["<rx>", "<|dose|>"])
    assert new_tokens_of(folder) == {"tokens": ["<rx>", "<|dose|>"], "ids": [rx, dose],
                                     "special": ["<|dose|>"], "vocab_size": len(start) + 2}
    base = tiny_llama(vocab=len(start))   # the same random base, as PEFT users would load it
    base.resize_token_embeddings(len(theirs_tok), mean_resizing=False)
    theirs = peft.PeftModel.from_pretrained(base, folder).eval()
    ids = torch.tensor([theirs_tok("<rx> aspirin <|dose|> 2")["input_ids"]])
    assert rx in ids[0] and dose in ids[0]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, model(input_ids=ids).logits,
                                   atol=1e-5, rtol=0)
    saved = load_file(str(folder / "adapter_model.safetensors"))
    (emb,) = [t for k, t in saved.items() if "embed_tokens" in k]
    assert emb.shape[0] == len(start) + 2   # the grown matrix, PEFT's modules_to_save layout
    text_ids = tok("prescription", add_special_tokens=False)["input_ids"]
    assert (emb[rx] - start[text_ids].mean(0)).abs().max() > 1e-3   # the new row trained


def test_new_tokens_need_the_embeddings_trained(tmp_path, tok):
    with pytest.raises(DataError, match=r"add \['embed_tokens', 'lm_head'\] to it"):
        train(_cfg(tmp_path, []), model=tiny_llama(vocab=len(tok)), tokenizer=tok, quiet=True)


def test_our_loader_grows_the_base_and_tokenizer(tmp_path, tok):
    from loratune.adapters.io import load_adapter

    model = tiny_llama(vocab=len(tok))
    result = train(_cfg(tmp_path, ["embed_tokens", "lm_head"]), model=model, tokenizer=tok,
                   quiet=True)
    fresh_tok = load_tokenizer("smollm2-135m-instruct")
    fresh = tiny_llama(vocab=len(fresh_tok))
    load_adapter(fresh, result.adapter_dir, tokenizer=fresh_tok)
    assert fresh_tok.convert_tokens_to_ids(["<rx>", "<|dose|>"]) == [len(fresh_tok) - 2,
                                                                     len(fresh_tok) - 1]
    ids = torch.tensor([fresh_tok("<rx> aspirin <|dose|> 2")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(input_ids=ids).logits,
                                   model.eval()(input_ids=ids).logits, atol=1e-5, rtol=0)
    other = load_tokenizer("smollm2-135m-instruct")
    other.add_tokens(["<zz>"])   # a tokenizer where <rx> would get another id
    with pytest.raises(DataError, match=r"new_tokens.json: its tokens .* this tokenizer gives"):
        load_adapter(tiny_llama(vocab=len(other)), result.adapter_dir, tokenizer=other)
