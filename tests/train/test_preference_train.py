"""Preference objectives through the training recipe, on a tiny random Llama (seconds)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from loratune.config import ConfigError, build_config
from loratune.train import train
from loratune.train.preference_loss import Reference
from loratune.train.reference_cache import CACHE_FILE, cached_reference, read_cache
from tiny import tiny_llama, write_pairs

WORDS = ["apple", "river", "stone", "cloud", "green", "metal", "piano", "tiger", "lemon",
         "candle", "forest", "rocket"]


@pytest.fixture
def pairs_file(tmp_path):
    return write_pairs(tmp_path / "pairs.jsonl", WORDS, "I refuse to say {w}.")


def _cfg(tmp_path, data, name, objective, adapter=None, preference=None, **train):
    settings = {"objective": objective, "max_steps": 8, "batch_size": 4, "lr": 2e-2,
                "warmup_ratio": 0.0, "schedule": "constant", "eval_every": 4,
                "preference": preference or {}, **train}
    return build_config({"output_dir": str(tmp_path / name),
                         "adapter": adapter or {"r": 4, "lora_alpha": 8},
                         "data": {"train": str(data), "max_length": 64, "eval_fraction": 0.25},
                         "train": settings})


def _run(cfg, tok, model=None, **kw):
    model = model if model is not None else tiny_llama(vocab=len(tok))
    return train(cfg, model=model, tokenizer=tok, quiet=True, **kw), model


def _records(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("objective", ["dpo", "ipo", "orpo", "simpo", "kto"])
def test_each_objective_trains_and_logs_its_metrics(tmp_path, pairs_file, smol_tokenizer,
                                                    objective):
    result, _ = _run(_cfg(tmp_path, pairs_file, objective, objective), smol_tokenizer)
    records = _records(result.output_dir)
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 8
    keys = {"rewards_chosen", "rewards_rejected", "margin"} | \
        ({"kl"} if objective == "kto" else {"accuracy"})
    assert keys <= set(steps[-1])
    held = [r for r in records if "eval_loss" in r]
    assert held and ("eval_accuracy" in held[-1]) == (objective != "kto")
    # the chosen answers gain on the rejected ones
    assert steps[-1]["margin"] > steps[0]["margin"]
    assert result.final_loss < steps[0]["loss"]
    summary = json.loads((result.output_dir / "run_summary.json").read_text())
    assert summary["objective"] == objective
    assert (result.output_dir / "loss.png").stat().st_size > 0
    assert (result.output_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_dpo_starts_at_log_2_with_accuracy_rising(tmp_path, pairs_file, smol_tokenizer):
    """A new adapter (B = 0) is its own reference: the first loss is log 2 exactly."""
    result, _ = _run(_cfg(tmp_path, pairs_file, "dpo", "dpo", max_steps=12), smol_tokenizer)
    steps = [r for r in _records(result.output_dir) if "loss" in r]
    assert steps[0]["loss"] == pytest.approx(0.693147, abs=1e-6)
    assert steps[0]["margin"] == 0.0
    assert sum(r["accuracy"] for r in steps[-3:]) / 3 > 0.9


def test_cached_reference_gives_the_live_run(tmp_path, pairs_file, smol_tokenizer):
    live, _ = _run(_cfg(tmp_path, pairs_file, "live", "dpo"), smol_tokenizer)
    cached, _ = _run(_cfg(tmp_path, pairs_file, "cached", "dpo",
                          preference={"reference": "cached"}), smol_tokenizer)
    assert (cached.output_dir / CACHE_FILE).is_file()
    assert not (live.output_dir / CACHE_FILE).exists()
    assert [h["loss"] for h in cached.history] == pytest.approx(
        [h["loss"] for h in live.history], abs=1e-6)
    a = load_file(str(live.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(cached.adapter_dir / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_the_cache_is_read_back_and_checked(tmp_path, pairs_file, smol_tokenizer):
    from loratune.adapters import add_adapter
    from loratune.config import DataConfig, LoraConfig
    from loratune.data.preference_pairs import build_preference_examples

    tok = smol_tokenizer
    examples, _ = build_preference_examples(pairs_file, tok, DataConfig(max_length=64), "pairs")
    model = tiny_llama(vocab=len(tok))
    add_adapter(model, LoraConfig(r=4))
    args = (model, Reference(), examples, tok.pad_token_id, 4, torch.device("cpu"), tmp_path,
            True)
    assert not cached_reference(*args, "base")  # computed and written
    first = [e.ref for e in examples]
    assert cached_reference(*args, "base")  # read
    assert [e.ref for e in examples] == first
    assert not cached_reference(*args, "another reference")  # fingerprint differs: recomputed
    examples[0].chosen = examples[0].chosen[:-1]
    assert read_cache(tmp_path / CACHE_FILE, "x") is None
    assert not cached_reference(*args, "another reference")  # other tokens: recomputed
    (tmp_path / CACHE_FILE).write_bytes(b"garbage")
    assert not cached_reference(*args, "another reference")  # damaged: recomputed, rewritten
    assert cached_reference(*args, "another reference")


def test_init_from_an_sft_adapter(tmp_path, pairs_file, smol_tokenizer):
    """DPO from an SFT adapter: its method and options come from the folder, the reference is
    that adapter frozen (first loss log 2 although the adapter is not zero), and it trains on."""
    sft_data = tmp_path / "sft.jsonl"
    sft_data.write_text("".join(json.dumps({"instruction": f"Repeat the word {w}",
                                            "output": f"{w} {w} {w}"}) + "\n" for w in WORDS))
    sft = build_config({"output_dir": str(tmp_path / "sft"),
                        "adapter": {"method": "dora", "r": 4, "lora_alpha": 8},
                        "data": {"train": str(sft_data), "max_length": 64},
                        "train": {"max_steps": 6, "batch_size": 4, "lr": 2e-2}})
    first, _ = _run(sft, smol_tokenizer)
    cfg = _cfg(tmp_path, pairs_file, "dpo", "dpo", adapter={"init_from": str(first.adapter_dir)},
               preference={"reference": "cached"})
    result, model = _run(cfg, smol_tokenizer)
    steps = [r for r in _records(result.output_dir) if "loss" in r]
    assert steps[0]["loss"] == pytest.approx(0.693147, abs=1e-6)
    assert steps[-1]["margin"] > 0.0
    saved = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert saved["use_dora"] is True and saved["r"] == 4 and "init_from" not in saved
    written = (result.output_dir / "config.yaml").read_text()
    assert f"init_from: {first.adapter_dir}" in written and "method: dora" in written
    before = load_file(str(first.adapter_dir / "adapter_model.safetensors"))
    after = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_init_from_refuses_other_options(tmp_path, pairs_file, smol_tokenizer):
    sft_data = tmp_path / "sft.jsonl"
    sft_data.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    first, _ = _run(build_config({"output_dir": str(tmp_path / "sft"), "adapter": {"r": 4},
                                  "data": {"train": str(sft_data), "max_length": 32},
                                  "train": {"max_steps": 1, "batch_size": 1}}), smol_tokenizer)
    folder = str(first.adapter_dir)
    with pytest.raises(ConfigError, match="adapter.r: the options of adapter.init_from come "
                       "from .*adapter_config.json \\(r=4\\)"):
        _run(_cfg(tmp_path, pairs_file, "a", "dpo", adapter={"init_from": folder, "r": 8}),
             smol_tokenizer)
    with pytest.raises(ConfigError, match="adapter.method: ia3, but adapter.init_from .* holds "
                       "a lora adapter"):
        _run(_cfg(tmp_path, pairs_file, "b", "dpo", adapter={"init_from": folder,
                                                             "method": "ia3"}), smol_tokenizer)
    with pytest.raises(ConfigError, match="adapter.init_from: .*missing is not a folder"):
        _run(_cfg(tmp_path, pairs_file, "c", "dpo",
                  adapter={"init_from": str(tmp_path / "missing")}), smol_tokenizer)
    assert not (tmp_path / "a").exists()  # refused before the run folder is made


@pytest.mark.parametrize("adapter,lr", [({"method": "ia3"}, 5e-2),
                                        ({"method": "prompt", "num_virtual_tokens": 4}, 0.3),
                                        ({"method": "bottleneck", "bottleneck_size": 8}, 5e-2),
                                        ({"method": "moe_lora", "r": 2, "num_experts": 2}, 5e-2),
                                        ({"method": "prefix", "num_virtual_tokens": 4}, 5e-2),
                                        ({"method": "adalora", "init_r": 4, "target_r": 2,
                                          "total_step": 8}, 5e-2)])
def test_other_methods_train_with_dpo(tmp_path, pairs_file, smol_tokenizer, adapter, lr):
    """The reference is the model with the adapter switched off, whatever the method."""
    cfg = _cfg(tmp_path, pairs_file, adapter["method"], "dpo", adapter=adapter, lr=lr)
    result, _ = _run(cfg, smol_tokenizer)
    steps = [r for r in _records(result.output_dir) if "loss" in r]
    if adapter["method"] not in ("prompt", "prefix"):  # random virtual tokens change the output
        assert steps[0]["loss"] == pytest.approx(0.693147, abs=1e-5)  # starts as the identity
    assert steps[-1]["margin"] > steps[0]["margin"]


def test_qlora_base_trains_with_dpo(tmp_path, pairs_file, smol_tokenizer):
    from loratune.config import QuantConfig
    from loratune.models.quantize import prepare_for_kbit_training, quantize_model

    model = tiny_llama(vocab=len(smol_tokenizer))
    quantize_model(model, QuantConfig())
    prepare_for_kbit_training(model)
    result, _ = _run(_cfg(tmp_path, pairs_file, "qlora", "dpo"), smol_tokenizer, model=model)
    steps = [r for r in _records(result.output_dir) if "loss" in r]
    assert steps[0]["loss"] == pytest.approx(0.693147, abs=1e-5)
    assert steps[-1]["margin"] > steps[0]["margin"]


def test_sft_data_for_a_preference_objective_is_named(tmp_path, smol_tokenizer):
    sft_data = tmp_path / "sft.jsonl"
    sft_data.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    from loratune.data import DataError

    with pytest.raises(DataError, match="sft.jsonl:1: not a preference record"):
        _run(_cfg(tmp_path, sft_data, "x", "dpo"), smol_tokenizer)


def test_example_config_and_bundled_pairs(smol_tokenizer):
    """examples/dpo.yaml reads; `demo-pairs` names the bundled pairs, which all tokenize and
    hold out their prompts."""
    from pathlib import Path

    from loratune.config import load_config
    from loratune.data.bundled import resolve_data_paths
    from loratune.data.preference_pairs import build_preference_examples

    cfg = load_config(Path(__file__).resolve().parents[2] / "examples" / "dpo.yaml")
    assert (cfg.train.objective, cfg.adapter.init_from) == ("dpo", "runs/sft/adapter")
    train_path, held_path = resolve_data_paths(cfg)
    assert Path(train_path).name == "pairs_train.jsonl"
    assert Path(held_path).name == "pairs_heldout.jsonl"
    train_ex, stats = build_preference_examples(train_path, smol_tokenizer, cfg.data, "pairs")
    held_ex, _ = build_preference_examples(held_path, smol_tokenizer, cfg.data, "pairs")
    assert (len(train_ex), len(held_ex), stats.n_truncated) == (600, 80, 0)
    assert all(e.chosen != e.rejected for e in train_ex + held_ex)
    assert not {tuple(e.prompt) for e in held_ex} & {tuple(e.prompt) for e in train_ex}


def test_resume_continues_exactly_and_reads_the_cache(tmp_path, pairs_file, smol_tokenizer,
                                                      capsys):
    import shutil

    full, _ = _run(_cfg(tmp_path, pairs_file, "full", "dpo", save_every=4, eval_every=None,
                        preference={"reference": "cached"}), smol_tokenizer)
    cut = tmp_path / "cut"
    shutil.copytree(full.output_dir, cut)
    (cut / "run_summary.json").unlink()
    shutil.rmtree(cut / "adapter")
    cfg = _cfg(tmp_path, pairs_file, "cut", "dpo", save_every=4, eval_every=None,
               preference={"reference": "cached"})
    model = tiny_llama(vocab=len(smol_tokenizer))
    resumed = train(cfg, model=model, tokenizer=smol_tokenizer, resume=True)
    assert "reference log-probs: read from" in capsys.readouterr().out
    assert [h["step"] for h in resumed.history] == [5, 6, 7, 8]
    assert [h["loss"] for h in resumed.history] == pytest.approx(
        [h["loss"] for h in full.history[4:]], abs=1e-6)
    a = load_file(str(full.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_identical_pairs_are_counted_once_before_training(tmp_path, smol_tokenizer, capsys,
                                                          objective):
    rows = [{"prompt": f"Repeat the word {w}", "chosen": f"{w} {w}", "rejected": "no"}
            for w in WORDS]
    for i in (1, 4, 7):  # the same answer twice: nothing to prefer
        rows[i]["rejected"] = rows[i]["chosen"]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train(_cfg(tmp_path, data, objective, objective, max_steps=2), model=tiny_llama(
        vocab=len(smol_tokenizer)), tokenizer=smol_tokenizer)
    out = capsys.readouterr().out.splitlines()
    warnings = [i for i, line in enumerate(out) if "chosen == rejected" in line]
    assert len(warnings) == 1, out
    assert out[warnings[0]].startswith(f"warning: 3 of 12 pairs in {data} have chosen == "
                                       "rejected")
    # right after the data line, before the adapter is even made
    assert out[warnings[0] - 1].startswith("data: ")
