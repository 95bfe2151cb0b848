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


def test_pool_refuses_an_adapter_with_new_tokens(tmp_path):
    tok = load_tokenizer("smollm2-135m-instruct")
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"say {w}", "output": f"<rx> {w}"}) + "\n"
                            for w in ["a", "b", "c", "d"]))
    cfg = build_config({
        "output_dir": str(tmp_path / "run"),
        "adapter": {"r": 4, "lora_alpha": 8, "modules_to_save": ["embed_tokens", "lm_head"]},
        "data": {"train": str(path), "max_length": 96, "add_tokens": ["<rx>"]},
        "train": {"max_steps": 1, "batch_size": 2, "warmup_ratio": 0.0}})
    base_rows = len(tok)
    result = train(cfg, model=tiny_llama(vocab=len(tok)), tokenizer=tok, quiet=True)
    served = tiny_llama(vocab=base_rows)
    with pytest.raises(BadAdapter, match=rf"adapter 'rx' .* adds tokens \(<rx>; vocabulary "
                       rf"{base_rows + 1}, the served base has {base_rows} rows\).*serve the "
                       "merged model"):
        read_lora("rx", result.adapter_dir, served)
