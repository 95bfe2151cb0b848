"""Preference losses against TRL (the oracle), in fp32 on a tiny random Llama.

One fixed batch, built by our data pipeline from the same records; the same base and LoRA
weights in both (ours saved, loaded into PEFT for TRL). Compared: the loss, and the gradient of
every LoRA A/B tensor. TRL's trainers are driven through their own collators and loss code:
DPOTrainer (`loss_type` sigmoid and ipo; reference = PEFT adapter disabled) and KTOTrainer via
`compute_loss` on the collated batch; ORPOTrainer and CPOTrainer (`loss_type="simpo"`) via
`get_batch_loss_metrics` on the chosen_/rejected_ tensors their collator would give.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from loratune.adapters import add_adapter, load_adapter, mark_trainable, save_adapter, set_active
from loratune.adapters.io import adapter_tensors
from loratune.config import DataConfig, LoraConfig, TrainConfig
from loratune.data.preference_pairs import (build_preference_examples, collate_pairs,
                                            collate_unpaired)
from loratune.train.preference_loss import PreferenceLoss, Reference
from tiny import randomize_lora, tiny_llama, write_pairs

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")

TOL = dict(atol=1e-5, rtol=1e-5)
WORDS = ["apple", "river", "stone", "cloud"]


@pytest.fixture
def pairs_file(tmp_path):
    return write_pairs(tmp_path / "pairs.jsonl", WORDS, "I will not repeat {w}, sorry.")


@pytest.fixture
def kto_file(tmp_path):
    rows = [{"prompt": f"Repeat the word {w}", "completion": f"{w} {w} {w}" if i % 2 else
             f"no {w}", "label": bool(i % 2)} for i, w in enumerate(WORDS + ["green", "metal"])]
    path = tmp_path / "kto.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _base(tok, sharpen: float):
    model = tiny_llama(vocab=len(tok))
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen)  # > 1: confident predictions, log-probs near 0
    return model


def _models(tmp_path, tok, sharpen: float = 1.0):
    """Ours (LoRA with nonzero B: policy differs from reference) and PEFT's copy of it."""
    ours = _base(tok, sharpen)
    torch.manual_seed(3)
    add_adapter(ours, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                     "down_proj"]))
    randomize_lora(ours, scale=0.5)
    folder = save_adapter(ours, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(_base(tok, sharpen), folder, is_trainable=True)
    ours.train()
    theirs.train()
    return ours, theirs


def _our_grads(model) -> dict[str, torch.Tensor]:
    return {k: t.grad.clone() for k, t in adapter_tensors(model, "default").items()}


def _peft_grads(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            out[name.replace(".default.weight", ".weight")] = p.grad.clone()
    return out


def _compare(our_loss, their_loss, ours, theirs):
    torch.testing.assert_close(our_loss.detach(), their_loss.detach().float(), **TOL)
    mine, peft_g = _our_grads(ours), _peft_grads(theirs)
    assert set(mine) == set(peft_g) and mine
    for key in mine:
        torch.testing.assert_close(mine[key], peft_g[key], **TOL, msg=key)
    assert any(g.abs().max() > 1e-4 for g in mine.values())  # a gradient worth comparing


def _ours(objective, examples, tok, ours, train_on="answers", reference=None, **prefs):
    cfg = TrainConfig(objective=objective, preference=prefs)
    collate = collate_unpaired if objective == "kto" else collate_pairs
    batch = collate(examples, tok.pad_token_id)
    loss_sum, n = PreferenceLoss(cfg, Reference(reference), train_on)(ours, batch)
    loss = loss_sum / n
    loss.backward()
    return loss, batch


def _base_reference(peft_model) -> None:
    """TRL keeps a frozen copy ("ref") of an adapter it is given as the reference; without it
    the reference is the adapter disabled, as ours without adapter.init_from."""
    if "ref" in peft_model.peft_config:
        peft_model.delete_adapter("ref")
    peft_model.set_adapter("default")


def _trainer_args(cls, tmp_path, **kw):
    return cls(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, bf16=False,
               per_device_train_batch_size=4, **kw)


def _dummy_dataset(kind: str):
    if kind == "kto":
        return datasets.Dataset.from_list([{"prompt": "a", "completion": "b", "label": True},
                                           {"prompt": "a", "completion": "c", "label": False}])
    return datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}] * 2)


@pytest.mark.parametrize("objective,loss_type,beta", [("dpo", "sigmoid", 0.1),
                                                      ("dpo", "sigmoid", 0.7),
                                                      ("ipo", "ipo", 0.3)])
def test_dpo_and_ipo_match_trl(tmp_path, pairs_file, smol_tokenizer, objective, loss_type, beta):
    from trl import DPOConfig, DPOTrainer

    tok = smol_tokenizer
    examples, _ = build_preference_examples(pairs_file, tok, DataConfig(max_length=64), "pairs")
    ours, theirs = _models(tmp_path, tok)
    our_loss, _ = _ours(objective, examples, tok, ours, beta=beta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(model=theirs, args=_trainer_args(DPOConfig, tmp_path, beta=beta,
                                                              loss_type=[loss_type]),
                             train_dataset=_dummy_dataset("pairs"), processing_class=tok)
    _base_reference(theirs)
    inputs = trainer.data_collator([{"prompt_ids": e.prompt, "chosen_ids": e.chosen,
                                     "rejected_ids": e.rejected} for e in examples])
    their_loss = trainer.compute_loss(trainer.model, inputs)
    their_loss.backward()
    _compare(our_loss, their_loss, ours, theirs)


def test_kto_matches_trl(tmp_path, kto_file, smol_tokenizer):
    from trl import KTOConfig, KTOTrainer

    tok = smol_tokenizer
    examples, _ = build_preference_examples(kto_file, tok, DataConfig(max_length=64), "unpaired")
    assert examples[0].kl_completion == examples[-1].completion  # the previous one's, cyclic
    ours, theirs = _models(tmp_path, tok)
    weights = dict(desirable_weight=1.3, undesirable_weight=0.8)
    our_loss, _ = _ours("kto", examples, tok, ours, beta=0.5, **weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = KTOTrainer(model=theirs, args=_trainer_args(KTOConfig, tmp_path, beta=0.5,
                                                              **weights),
                             train_dataset=_dummy_dataset("kto"), processing_class=tok)
    _base_reference(theirs)
    inputs = trainer.data_collator([{"prompt_ids": e.prompt, "completion_ids": e.completion,
                                     "KL_completion_ids": e.kl_completion,
                                     "label": e.desirable} for e in examples])
    their_loss = trainer.compute_loss(trainer.model, inputs)
    their_loss.backward()
    _compare(our_loss, their_loss, ours, theirs)


def _chosen_rejected(batch: dict, n: int) -> dict:
    """Our rows as the chosen_/rejected_ tensors of TRL's ORPO/CPO collator."""
    out = {}
    for side, rows in (("chosen", slice(0, n)), ("rejected", slice(n, 2 * n))):
        out[f"{side}_input_ids"] = batch["input_ids"][rows]
        out[f"{side}_attention_mask"] = batch["attention_mask"][rows]
        out[f"{side}_labels"] = batch["labels"][rows]
    return out


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_simpo_matches_trl_cpo(tmp_path, pairs_file, smol_tokenizer, smoothing):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    tok = smol_tokenizer
    examples, _ = build_preference_examples(pairs_file, tok, DataConfig(max_length=64), "pairs")
    ours, theirs = _models(tmp_path, tok)
    our_loss, batch = _ours("simpo", examples, tok, ours, beta=2.0, simpo_gamma=0.7,
                            label_smoothing=smoothing)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = CPOTrainer(model=theirs, args=_trainer_args(
            CPOConfig, tmp_path, loss_type="simpo", cpo_alpha=0.0, beta=2.0, simpo_gamma=0.7,
            label_smoothing=smoothing), train_dataset=_dummy_dataset("pairs"),
            processing_class=tok)
    their_loss, _ = trainer.get_batch_loss_metrics(trainer.model,
                                                   _chosen_rejected(batch, len(examples)))
    their_loss.backward()
    _compare(our_loss, their_loss, ours, theirs)


@torch.no_grad()
def _likely(model, prompt: list[int], n: int) -> list[int]:
    """The model's greedy continuation: a completion it finds likely (ORPO's odds matter)."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_orpo_matches_trl(tmp_path, pairs_file, smol_tokenizer):
    """TRL's ORPO takes its NLL over prompt and answer: our data.train_on: all. The chosen
    and rejected answers are ones the (sharpened) model finds likely, so log(1 - p) is far from
    0 and the odds term is not saturated."""
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    tok = smol_tokenizer
    examples, _ = build_preference_examples(pairs_file, tok, DataConfig(max_length=64), "pairs")
    ours, theirs = _models(tmp_path, tok, sharpen=40.0)
    for e in examples:  # both likely: the odds term is not saturated
        e.chosen, e.rejected = _likely(ours, e.prompt, 4), _likely(ours, e.prompt, 7)
    our_loss, batch = _ours("orpo", examples, tok, ours, train_on="all", orpo_lambda=0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = ORPOTrainer(model=theirs, args=_trainer_args(ORPOConfig, tmp_path, beta=0.25),
                              train_dataset=_dummy_dataset("pairs"), processing_class=tok)
    their_loss, _ = trainer.get_batch_loss_metrics(trainer.model,
                                                   _chosen_rejected(batch, len(examples)))
    their_loss.backward()
    _compare(our_loss, their_loss, ours, theirs)


def test_orpo_answers_are_likely(tmp_path, pairs_file, smol_tokenizer):
    """The ORPO comparison above is only a test of the odds term when p(answer) is not tiny."""
    tok = smol_tokenizer
    examples, _ = build_preference_examples(pairs_file, tok, DataConfig(max_length=64), "pairs")
    ours, _ = _models(tmp_path, tok, sharpen=40.0)
    e = examples[0]
    e.chosen = _likely(ours, e.prompt, 4)
    batch = collate_pairs([e], tok.pad_token_id)
    from loratune.train.preference_loss import completion_mask, row_sums

    mean = row_sums(ours, batch, completion_mask(batch), 1024)[0] / len(e.chosen)
    assert mean > -2.0  # log(1 - p) < log(1 - e**-2) ~ -0.15: far beyond the tolerance


def test_dpo_from_a_started_adapter_matches_trl(tmp_path, pairs_file, smol_tokenizer):
    """adapter.init_from: the reference is the starting adapter, frozen (TRL: its "ref" copy
    of the adapter it is given), not the base. Both trained adapters are moved away from it
    by the same amount, as training would."""
    from trl import DPOConfig, DPOTrainer

    tok = smol_tokenizer
    examples, _ = build_preference_examples(pairs_file, tok, DataConfig(max_length=64), "pairs")
    ours, theirs = _models(tmp_path, tok)
    load_adapter(ours, tmp_path / "adapter", "ref")  # as objectives.start_adapter does
    set_active(ours, "default")
    mark_trainable(ours, "default")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(model=theirs, args=_trainer_args(DPOConfig, tmp_path, beta=0.5),
                             train_dataset=_dummy_dataset("pairs"), processing_class=tok)
    assert "ref" in theirs.peft_config
    g = torch.Generator().manual_seed(5)
    peft_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for key, tensor in sorted(adapter_tensors(ours, "default").items()):
            step = torch.randn(tensor.shape, generator=g) * 0.05
            tensor.add_(step)
            peft_params[key.replace(".weight", ".default.weight")].add_(step)
    our_loss, _ = _ours("dpo", examples, tok, ours, reference="ref", beta=0.5)
    inputs = trainer.data_collator([{"prompt_ids": e.prompt, "chosen_ids": e.chosen,
                                     "rejected_ids": e.rejected} for e in examples])
    their_loss = trainer.compute_loss(trainer.model, inputs)
    their_loss.backward()
    assert abs(float(our_loss) - 0.6931472) > 1e-3  # policy and reference differ
    _compare(our_loss, their_loss, ours, theirs)
