"""GRPO with every adapter method in the registry, and with a 4-bit (QLoRA) base.

Each run is the recipe's own: one step of two updates on a tiny Llama, beta > 0 (the
reference is the model with its adapter switched off) and mu = 2 (old-policy log-probs),
rollouts on the engine's batch. Asserted: the adapter moved; with the adapter off the model is
the base again (the reference the KL is taken against); the KL is positive after the first
update. No method is refused: each trains under GRPO.
"""

from __future__ import annotations

import json

import pytest
import torch

from loratune.adapters import disable_adapters
from loratune.adapters.io import adapter_tensors
from loratune.adapters.registry import method_names
from loratune.config import build_config
from loratune.config.run import QuantConfig
from loratune.recipes import grpo as recipe
from test_methods_train import METHODS as SFT_OPTIONS
from tiny import tiny_llama

# method -> (adapter options, lr): the SFT test's, plus the LoRA family
OPTIONS = {"lora": ({"r": 4, "lora_alpha": 8}, 5e-2), "dora": ({"r": 4, "lora_alpha": 8}, 5e-2),
           **{m: (options, lr) for m, (options, lr, _) in SFT_OPTIONS.items()},
           # AdaLoRA's schedule fits the two updates of a run: at target_r after them
           "adalora": ({"init_r": 6, "target_r": 3, "tinit": 0, "tfinal": 1, "deltaT": 1,
                        "lora_alpha": 8}, 5e-2)}
IDS = torch.tensor([[5, 900, 17, 4000, 31, 77, 1200]])
REWARD_FILE = '''
def vowels(prompts, completions, **kw):
    return [sum(ch in "aeiou" for ch in c) / (1 + len(c)) for c in completions]
'''


def _cfg(tmp_path, method: str, options: dict, lr: float) -> object:
    tmp_path.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": f"Say {w}"} for w in ["apple", "river", "stone", "cloud"]]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    reward = tmp_path / "rewards.py"
    reward.write_text(REWARD_FILE)
    return build_config({
        "output_dir": str(tmp_path / "run"),
        "adapter": {"method": method, **options},
        "data": {"train": str(data)},
        "train": {"objective": "grpo", "max_steps": 1, "batch_size": 4, "grad_accum": 2,
                  "lr": lr, "warmup_ratio": 0.0, "save_every": 100, "eval_every": 100,
                  "rl": {"num_generations": 4, "max_completion_length": 5, "beta": 0.1,
                         "num_iterations": 2, "scale_rewards": "none",
                         "rewards": [{"function": f"{reward}:vowels"}]}},
    })


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _run(tmp_path, tok, method: str, quantized: bool = False):
    model = tiny_llama(vocab=len(tok))
    if quantized:
        from loratune.models.quantize import quantize_model

        quantize_model(model, QuantConfig())
    base = _logits(model)
    cfg = _cfg(tmp_path, method, *OPTIONS[method])
    result = recipe.train_grpo(cfg, model=model, tokenizer=tok, quiet=True)
    return result, model, base


def _check_moved_and_reference(result, model, base):
    assert [r["rows_updated"] for r in result.history] == [8]
    after = _logits(model)
    assert (after - base).abs().max() > 1e-4, "the adapter did not change the model"
    with disable_adapters(model):  # the reference: adapter off = the base, whatever the method
        torch.testing.assert_close(_logits(model), base, atol=1e-5, rtol=0)
    assert result.history[0]["kl"] > 0  # the second update's, after the first moved it


@pytest.mark.parametrize("method", method_names())
def test_a_grpo_step_trains_every_method(tmp_path, smol_tokenizer, method):
    result, model, base = _run(tmp_path, smol_tokenizer, method)
    _check_moved_and_reference(result, model, base)


def test_grpo_on_a_4bit_base(tmp_path, smol_tokenizer):
    from loratune.quant.linear4bit import Linear4bit

    result, model, base = _run(tmp_path, smol_tokenizer, "lora", quantized=True)
    assert any(isinstance(m, Linear4bit) for m in model.modules())
    _check_moved_and_reference(result, model, base)


def test_method_hooks_run_under_grpo(tmp_path, smol_tokenizer, monkeypatch):
    """AdaLoRA reallocates its rank budget after each update (down to target_r); MoE-LoRA's
    balance loss is added to each micro-batch."""
    from loratune.adapters.adalora import final_ranks
    from loratune.adapters.moe_lora import MoeLoraHooks

    _, model, _ = _run(tmp_path / "adalora", smol_tokenizer, "adalora")
    ranks = final_ranks(model, "default")
    assert ranks and set(ranks.values()) != {6}
    assert sum(ranks.values()) == 3 * len(ranks)
    calls = []
    real = MoeLoraHooks.micro_loss
    monkeypatch.setattr(MoeLoraHooks, "micro_loss", lambda self: calls.append(1) or real(self))
    _run(tmp_path / "moe", smol_tokenizer, "moe_lora")
    assert len(calls) == 2 * 2  # two micro-batches in each of two updates


def test_gradient_checkpointing_recomputes_layers_and_changes_nothing(tmp_path, smol_tokenizer):
    """train.gradient_checkpointing under GRPO: each decoder layer runs again in backward
    (layer 0's MLP called once more per micro-batch), and the adapter comes out the same."""
    adapters, calls = [], []
    for on in (False, True):
        cfg = _cfg(tmp_path / str(on), "lora", *OPTIONS["lora"])
        cfg.train.gradient_checkpointing = on
        model = tiny_llama(vocab=len(smol_tokenizer))
        seen = []
        model.model.layers[0].mlp.register_forward_pre_hook(
            lambda *a: seen.append(1) if torch.is_grad_enabled() else None)
        recipe.train_grpo(cfg, model=model, tokenizer=smol_tokenizer, quiet=True)
        adapters.append(adapter_tensors(model, "default"))
        calls.append(len(seen))
    assert calls == [2 * 2, 2 * 2 * 2]  # two updates of two micro-batches; then recomputed
    for k in adapters[0]:
        torch.testing.assert_close(adapters[1][k], adapters[0][k], atol=1e-6, rtol=0, msg=k)
