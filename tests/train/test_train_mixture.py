"""Training on a mixture (data.train as a list) with held-out loss per source (data.eval as a
list), on a tiny random Llama with the SmolLM2 tokenizer."""

import json

import pytest
import torch
from safetensors.torch import load_file

from loratune.config import build_config
from loratune.train import train
from tiny import tiny_llama

WORDS = {"fruit": ["apple", "lemon", "mango", "peach", "grape", "melon", "berry", "plum"],
         "tools": ["hammer", "wrench", "saw", "drill", "chisel", "pliers"]}


@pytest.fixture
def sources(tmp_path):
    paths = {}
    for name, words in WORDS.items():
        for part, chosen in (("train", words), ("held", words[:3])):
            rows = [{"instruction": f"Repeat the {name} word {w}", "output": f"{w} {w}"}
                    for w in chosen]
            path = tmp_path / f"{name}_{part}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            paths[name, part] = str(path)
    return paths


def _cfg(tmp_path, name, train_spec, eval_spec, **train_opts):
    return build_config({
        "output_dir": str(tmp_path / name),
        "adapter": {"r": 4, "lora_alpha": 8, "modules_to_save": ["lm_head"]},
        "data": {"train": train_spec, "eval": eval_spec, "max_length": 64},
        "train": {"max_steps": 6, "batch_size": 2, "lr": 5e-3, "warmup_ratio": 0.0,
                  **train_opts}})


def _mixture(paths):
    return [{"path": paths["fruit", "train"], "name": "fruit", "weight": 0.8},
            {"path": paths["tools", "train"], "name": "tools", "weight": 0.2}]


def _run(cfg, tok, **kw):
    torch.manual_seed(0)
    return train(cfg, model=tiny_llama(vocab=len(tok)), tokenizer=tok, quiet=True, **kw)


def test_mixture_logs_shares_and_eval_per_source(tmp_path, sources, smol_tokenizer):
    held = [{"path": sources["fruit", "held"], "name": "fruit"},
            {"path": sources["tools", "held"], "name": "tools"}]
    result = _run(_cfg(tmp_path, "mix", _mixture(sources), held), smol_tokenizer)
    summary = json.loads((result.output_dir / "run_summary.json").read_text())
    shares = summary["mixture"]["sources"]
    assert shares["fruit"]["examples"] + shares["tools"]["examples"] == 14  # 8 + 6 draws
    assert shares["fruit"]["share"] > 0.6 and shares["fruit"]["weight"] == 0.8
    lines = (result.output_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines]
    assert records[0]["mixture_share/fruit"] == shares["fruit"]["share"]
    final = records[-1]
    assert set(summary["eval_loss_by_source"]) == {"fruit", "tools"}
    assert final["eval_loss/tools"] == summary["eval_loss_by_source"]["tools"]
    # each source's held-out loss is that file's loss alone: same training, one eval file
    alone = _run(_cfg(tmp_path, "alone", _mixture(sources), sources["tools", "held"]),
                 smol_tokenizer)
    assert final["eval_loss/tools"] == pytest.approx(alone.eval_loss, rel=1e-5)
    assert abs(final["eval_loss/fruit"] - final["eval_loss/tools"]) > 0.01


def test_mixture_resumes_exactly(tmp_path, sources, smol_tokenizer):
    full = _run(_cfg(tmp_path, "full", _mixture(sources), None), smol_tokenizer)
    cfg = _cfg(tmp_path, "cut", _mixture(sources), None, save_every=3)
    _run(cfg, smol_tokenizer)
    out = tmp_path / "cut"
    (out / "run_summary.json").unlink()
    resumed = _run(cfg, smol_tokenizer, resume=True)
    assert [h["loss"] for h in resumed.history] == pytest.approx(
        [h["loss"] for h in full.history[3:]], rel=1e-5)
    a = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_mixture_refusals_name_the_option(tmp_path, sources, smol_tokenizer):
    cfg = _cfg(tmp_path, "s", _mixture(sources), None)
    cfg.data.streaming = True
    with pytest.raises(ValueError, match="data.streaming: true streams one source"):
        _run(cfg, smol_tokenizer)
    cfg = _cfg(tmp_path, "f", _mixture(sources), None)
    cfg.data.eval_fraction = 0.2
    with pytest.raises(ValueError, match="give held-out data per source as data.eval"):
        _run(cfg, smol_tokenizer)
