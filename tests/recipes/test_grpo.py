"""The GRPO recipe end to end on a tiny Llama: metrics, samples, failures, exact resume."""

from __future__ import annotations

import json

import pytest
import torch

from loratune.adapters.adalora import adalora_modules
from loratune.adapters.io import adapter_tensors
from loratune.config import ConfigError, build_config
from loratune.recipes import grpo as recipe
from loratune.train.rl_rewards import RewardError
from loratune.train.run_folder import RunFolderError
from tiny import tiny_llama

# The tiny model's vocabulary is the real tokenizer's: a reward on the completion text's
# characters is one it can move in a few steps.
REWARD_FILE = '''
def vowels(prompts, completions, **kw):
    return [sum(ch in "aeiou" for ch in c) / (1 + len(c)) for c in completions]
'''


@pytest.fixture
def prompt_file(tmp_path):
    rows = [{"prompt": f"Say {w}", "answer": w} for w in
            ["apple", "river", "stone", "cloud", "green", "metal", "piano", "tiger"]]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(tmp_path, prompt_file, name="run", adapter=None, **rl):
    reward = tmp_path / "rewards.py"
    reward.write_text(REWARD_FILE)
    return build_config({
        "output_dir": str(tmp_path / name),
        "adapter": adapter or {"r": 4, "lora_alpha": 8},
        "data": {"train": str(prompt_file), "eval_fraction": 0.25},
        "train": {"objective": "grpo", "max_steps": 4, "batch_size": 4, "grad_accum": 2,
                  "lr": 2e-2, "warmup_ratio": 0.0, "save_every": 2, "eval_every": 2,
                  "rl": {"num_generations": 4, "max_completion_length": 6, "beta": 0.1,
                         "num_iterations": 2, "rewards": [
                             {"function": f"{reward}:vowels"},
                             {"function": "exact_match", "weight": 0.5}], **rl}},
    })


def _records(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _run(cfg, tok, **kw):
    model = tiny_llama(vocab=len(tok))
    return recipe.train_grpo(cfg, model=model, tokenizer=tok, quiet=True, **kw), model


def test_grpo_writes_metrics_samples_and_adapter(tmp_path, prompt_file, smol_tokenizer):
    result, _ = _run(_cfg(tmp_path, prompt_file), smol_tokenizer)
    lines = _records(result.output_dir / "metrics.jsonl")
    assert [r["step"] for r in lines] == [0, 1, 2, 3, 4]
    assert lines[0].keys() == {"step", "eval_reward"}   # the held-out baseline, before training
    for key in ("reward/vowels/mean", "reward/vowels/std", "reward/exact_match/mean",
                "advantage_std", "kl", "clip_low_fraction", "clip_high_fraction",
                "completion_length", "zero_std_fraction", "rollout_seconds", "update_seconds"):
        assert key in lines[-1], key
    assert "eval_reward" in lines[2]
    assert lines[-1]["kl"] > 0  # the adapter moved away from the reference
    samples = (result.output_dir / "completions.jsonl").read_text().splitlines()
    assert len(samples) == 4 * 4
    assert json.loads(samples[0])["rewards"].keys() == {"vowels", "exact_match"}   # by name
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert (result.output_dir / "run_summary.json").is_file()


def _crash_and_resume(tmp_path, prompt_file, tok, monkeypatch, adapter=None):
    """(uninterrupted run, its model, run killed in step 3 and resumed from step-2, its model)"""
    whole, model_a = _run(_cfg(tmp_path, prompt_file, "whole", adapter), tok)
    real = recipe.grpo_step

    def crash_at_step_3(*args, **kw):
        if args[6] == 2:  # the third step (0-based): after checkpoint step-2
            raise KeyboardInterrupt("killed")
        return real(*args, **kw)

    cfg = _cfg(tmp_path, prompt_file, "cut", adapter)
    monkeypatch.setattr(recipe, "grpo_step", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        _run(cfg, tok)
    monkeypatch.setattr(recipe, "grpo_step", real)
    resumed, model_b = _run(_cfg(tmp_path, prompt_file, "cut", adapter), tok, resume=True)
    return whole, model_a, resumed, model_b


def test_resume_after_a_crash_is_exact(tmp_path, prompt_file, smol_tokenizer, monkeypatch):
    whole, model_a, resumed, model_b = _crash_and_resume(tmp_path, prompt_file, smol_tokenizer,
                                                         monkeypatch)
    a, b = adapter_tensors(model_a, "default"), adapter_tensors(model_b, "default")
    assert a.keys() == b.keys()
    assert max(float(t.detach().abs().max()) for t in a.values()) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
    first, again = (_records(r.output_dir / "metrics.jsonl") for r in (whole, resumed))
    assert [r["step"] for r in again] == [0, 1, 2, 3, 4]
    assert [r.get("reward") for r in first] == pytest.approx([r.get("reward") for r in again])


def test_adalora_resume_restores_the_rank_allocator(tmp_path, prompt_file, smol_tokenizer,
                                                     monkeypatch):
    """8 updates (4 steps x mu 2): budgeting through update 5, final allocation at 6. The
    resumed run scores updates 5-6 with the importance averages of updates 1-4 only if the
    checkpoint kept them (else it falls back to |E| and keeps other triplets)."""
    adapter = {"method": "adalora", "init_r": 6, "target_r": 3, "tinit": 0, "tfinal": 2,
               "deltaT": 1, "lora_alpha": 8}
    _, model_a, _, model_b = _crash_and_resume(tmp_path, prompt_file, smol_tokenizer,
                                               monkeypatch, adapter)
    a, b = adapter_tensors(model_a, "default"), adapter_tensors(model_b, "default")
    assert a.keys() == b.keys() and any(k.endswith("lora_E") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
    kept = [(m.kept.tolist(), n.kept.tolist()) for (_, m), (_, n) in
            zip(adalora_modules(model_a, "default"), adalora_modules(model_b, "default"))]
    assert all(x == y for x, y in kept) and not all(all(x) for x, _ in kept)


def test_eva_is_refused_by_name_before_loading(tmp_path, prompt_file, smol_tokenizer):
    """EVA is fitted to SFT batches; GRPO's prompts are too short for its SVDs to settle (a
    fit on them ran 1000 batches without settling): refused before the model loads."""
    adapter = {"r": 4, "lora_alpha": 8, "init_lora_weights": "eva", "eva_config": {"tau": 0.9}}
    with pytest.raises(ConfigError, match=r"adapter.init_lora_weights: eva .*train.objective "
                                          r"grpo"):
        _run(_cfg(tmp_path, prompt_file, adapter=adapter), smol_tokenizer)
    assert not (tmp_path / "run").exists()


def test_a_finished_run_folder_is_refused_before_the_model_loads(tmp_path, prompt_file,
                                                                  monkeypatch):
    cfg = _cfg(tmp_path, prompt_file)
    _run_dir = tmp_path / "run"
    _run_dir.mkdir()
    (_run_dir / "run_summary.json").write_text("{}")
    monkeypatch.setattr(recipe, "load_base", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(RunFolderError, match="holds a finished run"):
        recipe.train_grpo(cfg, quiet=True)


def test_a_failing_reward_stops_the_step_and_names_it(tmp_path, prompt_file, smol_tokenizer):
    bad = tmp_path / "bad.py"
    bad.write_text("def flaky(prompts, completions, **kw):\n    return [float('nan')] * "
                   "len(completions)\n")
    cfg = _cfg(tmp_path, prompt_file)
    cfg.train.rl.rewards[0].function = f"{bad}:flaky"
    with pytest.raises(RewardError, match=r"reward flaky returned nan for sample 0 \(prompt "):
        _run(cfg, smol_tokenizer)


def test_grpo_config_errors():
    with pytest.raises(Exception, match="needs train.rl.rewards"):
        build_config({"train": {"objective": "grpo"}})
    with pytest.raises(Exception, match="multiple of train.rl.num_generations"):
        build_config({"train": {"objective": "grpo", "batch_size": 6, "rl": {
            "num_generations": 4, "rewards": [{"function": "exact_match"}]}}})
