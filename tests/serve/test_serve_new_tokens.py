"""The adapter pool refuses an adapter that adds tokens by name: another vocabulary cannot
share a batch with the served base's rows; its merged model serves it."""

import json

import pytest

from loratune.config import build_config
from loratune.models import load_tokenizer
from loratune.serve.pool import read_lora
from loratune.serve.types import BadAdapter
from loratune.train import train
from tiny import tiny_llama


def rx_config(tmp_path, train: dict):
    """A run that adds the token <rx> and teaches it on four records, in tmp_path."""
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"say {w}", "output": f"<rx> {w}"}) + "\n"
                            for w in ["a", "b", "c", "d"]))
    return build_config({
        "output_dir": str(tmp_path / "run"),
        "adapter": {"r": 4, "lora_alpha": 8, "modules_to_save": ["embed_tokens", "lm_head"]},
        "data": {"train": str(path), "max_length": 96, "add_tokens": ["<rx>"]},
        "train": train})


def test_pool_refuses_an_adapter_with_new_tokens(tmp_path):
    tok = load_tokenizer("smollm2-135m-instruct")
    cfg = rx_config(tmp_path, {"max_steps": 1, "batch_size": 2, "warmup_ratio": 0.0})
    base_rows = len(tok)
    result = train(cfg, model=tiny_llama(vocab=len(tok)), tokenizer=tok, quiet=True)
    served = tiny_llama(vocab=base_rows)
    with pytest.raises(BadAdapter, match=rf"adapter 'rx' .* adds tokens \(<rx>; vocabulary "
                       rf"{base_rows + 1}, the served base has {base_rows} rows\).*serve the "
                       "merged model"):
        read_lora("rx", result.adapter_dir, served)


def test_serving_the_merged_model_keeps_the_new_tokens(tmp_path, monkeypatch):
    """`loratune serve --model <merged folder>` (the engine as serve builds it, fp32): a prompt
    with a new token is encoded to its one new id, and the greedy reply, through the engine and
    over HTTP, equals the adapted model's own generate()."""
    import torch
    import uvicorn
    from fastapi.testclient import TestClient

    from loratune.cli import main
    from loratune.export.merge import merge_folder, read_adapters
    from loratune.serve.types import GenerationRequest, SamplingParams

    tok = load_tokenizer("smollm2-135m-instruct")
    base = tmp_path / "base"
    tiny_llama(vocab=len(tok)).save_pretrained(base)
    tok.save_pretrained(base)
    cfg = rx_config(tmp_path, {"max_steps": 3, "batch_size": 2, "lr": 1e-2, "warmup_ratio": 0.0})
    model = tiny_llama(vocab=len(tok))
    result = train(cfg, model=model, tokenizer=tok, quiet=True)
    model.eval()
    merged = merge_folder(base, read_adapters([result.adapter_dir], None), tmp_path / "m").out
    text = "say <rx> b"
    ids = tok(text)["input_ids"]
    new_id = tok.convert_tokens_to_ids("<rx>")
    assert new_id == len(tok) - 1 and ids.count(new_id) == 1
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    served = {}

    def fake_run(app, **_):      # the started engine, driven before serve stops it
        engine = app.state.loratune.engine
        engine.eos = set()
        served["ids"] = engine.tokenizer(text)["input_ids"]
        served["reply"] = engine.submit(GenerationRequest(
            served["ids"], {}, SamplingParams(max_tokens=8))).result().token_ids
        with TestClient(app, base_url="http://127.0.0.1:8000") as client:
            served["http"] = client.post("/v1/completions", json={
                "model": served_name, "prompt": text, "temperature": 0, "max_tokens": 8})

    served_name = merged.resolve().stem
    monkeypatch.setattr(uvicorn, "run", fake_run)
    assert main(["serve", "--model", str(merged), "--dtype", "float32", "--device", "cpu"]) == 0
    assert served["ids"] == ids and served["reply"] == ref
    assert served["http"].status_code == 200, served["http"].text
    assert served["http"].json()["choices"][0]["text"] == tok.decode(ref,
                                                                     skip_special_tokens=True)
