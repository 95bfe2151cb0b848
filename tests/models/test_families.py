"""The family matrix: every family of tests/families.py through load, train, merge, QLoRA,
planner, masking and stopping."""

import pytest
import torch

from families import FAMILIES, FAMILY_SPECS, build_family


@pytest.mark.parametrize("name", FAMILIES)
def test_fixture_is_the_family(name):
    """The tiny model has the family's quirks and the tokenizer its special tokens."""
    model, tok = build_family(name)
    fam = FAMILY_SPECS[name]
    assert model.config.model_type == fam.model_type
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    assert ("qkv_proj" in names and "gate_up_proj" in names) == fam.fused
    assert (model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()) \
        == fam.tie
    for t in fam.specials + fam.generation_eos + (fam.end_of_turn,):
        assert len(tok(t, add_special_tokens=False).input_ids) == 1, t
    assert model.generation_config.eos_token_id == [tok.convert_tokens_to_ids(t)
                                                    for t in fam.generation_eos]
    text = "Hello world, apple 123! é"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    assert torch.isfinite(model(tok(text, return_tensors="pt").input_ids).logits).all()
