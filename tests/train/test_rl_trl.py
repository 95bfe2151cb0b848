"""GRPO and its successors against TRL's GRPOTrainer (the oracle), in fp32 on a tiny Llama.

The same base and LoRA weights in both (ours saved, loaded into PEFT for TRL). TRL's own
`_generate_and_score_completions` runs with its generation replaced by our fixed completions
and a reward function (TRL's signature) returning fixed rewards; it computes advantages, the
reference log-probs (PEFT adapter disabled) and, for mu = 2, old log-probs. For mu = 2 both
sides are then given the same old log-probs from a perturbed adapter, so the ratios are not 1
and the clip bites. Compared: advantages, the loss and the gradient of every LoRA A/B.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from loratune.adapters import add_adapter, save_adapter
from loratune.adapters.io import adapter_tensors
from loratune.config import LoraConfig
from loratune.train.rl_batch import RolloutBatch, completion_logps, pad_rows, reference_logps
from loratune.train.rl_loss import LossSpec, group_advantages, policy_loss
from tiny import randomize_lora, tiny_llama

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")

TOL = dict(atol=1e-5, rtol=1e-5)
G = 4
MAX_LEN = 9
TEMPERATURE = 0.7
REWARDS = [1.0, 0.0, 0.5, 0.0, 2.0, -1.0, 0.0, 0.25]
TRL_LOSS = {"grpo": ("grpo", "token"), "bnpo": ("bnpo", "token"),
            "dr_grpo": ("dr_grpo", "token"), "dapo": ("dapo", "token"),
            "gspo": ("grpo", "sequence")}
EPS = {"grpo": (0.2, 0.2), "bnpo": (0.2, 0.2), "dr_grpo": (0.2, 0.2), "dapo": (0.2, 0.28),
       "gspo": (3e-4, 4e-4)}


def _rollouts(tok):
    """Two prompts of different lengths, four completions each (lengths 3..9)."""
    prompts = [tok("Add 2 and 3.")["input_ids"], tok("What is seven times six?")["input_ids"]]
    g = torch.Generator().manual_seed(11)
    rows, completions = [], []
    for i in range(len(prompts) * G):
        n = 3 + (i * 5) % (MAX_LEN - 2)
        rows.append(prompts[i // G])
        completions.append(torch.randint(100, 5000, (n,), generator=g).tolist())
    return prompts, rows, completions


def _models(tmp_path, tok):
    ours = tiny_llama(vocab=len(tok))
    torch.manual_seed(3)
    add_adapter(ours, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                     "down_proj"]))
    randomize_lora(ours, scale=0.5)
    folder = save_adapter(ours, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(vocab=len(tok)), folder,
                                            is_trainable=True)
    return ours.train(), theirs.train()


@torch.no_grad()
def _perturbed_logps(model, batch):
    """Old-policy log-probs: the adapter's B moved a little, then put back."""
    saved = {k: t.clone() for k, t in adapter_tensors(model, "default").items()}
    g = torch.Generator().manual_seed(7)
    for t in adapter_tensors(model, "default").values():
        t.add_(torch.randn(t.shape, generator=g) * 0.3)
    old = completion_logps(model.eval(), batch, TEMPERATURE)
    for k, t in adapter_tensors(model, "default").items():
        t.copy_(saved[k])
    model.train()
    return old


def _trl_trainer(tmp_path, tok, theirs, loss, beta, mu, kl_correction=True, accum=1):
    from trl import GRPOConfig, GRPOTrainer

    loss_type, level = TRL_LOSS[loss]
    low, high = EPS[loss]
    args = GRPOConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True,
                      bf16=False, per_device_train_batch_size=len(REWARDS) // accum,
                      num_generations=G,
                      max_completion_length=MAX_LEN, temperature=TEMPERATURE, beta=beta,
                      num_iterations=mu, loss_type=loss_type, importance_sampling_level=level,
                      epsilon=low, epsilon_high=high, scale_rewards="group",
                      gradient_accumulation_steps=accum, use_bias_correction_kl=kl_correction)

    def fixed_rewards(prompts, completions, **kw):  # TRL's reward signature
        return list(REWARDS)

    data = datasets.Dataset.from_list([{"prompt": "a"}] * 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(model=theirs, reward_funcs=fixed_rewards, args=args,
                              train_dataset=data, processing_class=tok)
    # TRL keeps a frozen copy ("ref") of an adapter it is given as the reference; ours is the
    # adapter switched off (train.rl.beta), as TRL's for a new adapter.
    if "ref" in theirs.peft_config:
        theirs.delete_adapter("ref")
    theirs.set_adapter("default")
    return trainer


def _trl_inputs(trainer, tok, rows, completions, accum=1):
    text = tok.batch_decode(completions)

    def generate(prompts):
        return rows, completions, None, text, None, {}, None, None

    trainer._generate = generate
    trainer.current_gradient_accumulation_steps = accum  # set by its training loop, not here
    return trainer._generate_and_score_completions([{"prompt": "p"} for _ in rows])


def _our_batch(tok, rows, completions, advantages):
    p, pm = pad_rows(rows, tok.pad_token_id, left=True)
    c, cm = pad_rows(completions, tok.pad_token_id, left=False)
    return RolloutBatch(p, pm, c, cm, advantages)


def _grads(model, peft_names: bool) -> dict[str, torch.Tensor]:
    if not peft_names:
        return {k: t.grad.clone() for k, t in adapter_tensors(model, "default").items()}
    return {n.replace(".default.weight", ".weight"): p.grad.clone()
            for n, p in model.named_parameters() if p.requires_grad}


CASES = [(loss, beta, mu, True) for loss in ("grpo", "bnpo", "dr_grpo", "dapo", "gspo")
         for beta in (0.0, 0.3) for mu in (1, 2)] + [("dapo", 0.3, 2, False)]


@pytest.mark.parametrize("loss,beta,mu,kl_correction", CASES)
def test_loss_and_gradients_match_trl(tmp_path, smol_tokenizer, loss, beta, mu, kl_correction):
    tok = smol_tokenizer
    prompts, rows, completions = _rollouts(tok)
    ours, theirs = _models(tmp_path, tok)
    trainer = _trl_trainer(tmp_path, tok, theirs, loss, beta, mu, kl_correction)
    inputs = _trl_inputs(trainer, tok, rows, completions)

    adv, _ = group_advantages(torch.tensor(REWARDS), G, "group")
    torch.testing.assert_close(adv, inputs["advantages"].float(), **TOL)
    batch = _our_batch(tok, rows, completions, adv)
    assert torch.equal(batch.completion_mask, inputs["completion_mask"].long())
    if beta:
        batch.ref_logps = reference_logps(ours, batch, TEMPERATURE)
    if mu > 1:
        batch.old_logps = _perturbed_logps(ours, batch)
        inputs["old_per_token_logps"] = batch.old_logps.clone()
    low, high = EPS[loss]
    spec = LossSpec(loss, low, high, beta, MAX_LEN, kl_correction)
    logps = completion_logps(ours, batch, TEMPERATURE)
    our_loss, stats = policy_loss(logps, batch.old_logps, batch.ref_logps, adv,
                                  batch.completion_mask, spec, 1, float(batch.completion_mask.sum()))
    our_loss.backward()
    their_loss = trainer._compute_loss(trainer.model, inputs)
    their_loss.backward()

    torch.testing.assert_close(our_loss.detach(), their_loss.detach().float(), **TOL)
    mine, theirs_g = _grads(ours, False), _grads(theirs, True)
    assert set(mine) == set(theirs_g) and mine
    for key in mine:
        torch.testing.assert_close(mine[key], theirs_g[key], **TOL, msg=key)
    assert any(g.abs().max() > 1e-4 for g in mine.values())
    if mu > 1 and loss != "gspo":  # the perturbation moved ratios past the clip somewhere
        assert stats["clip_low_sum"] + stats["clip_high_sum"] > 0
