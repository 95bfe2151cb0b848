"""bias: vera_only / oft_only (PEFT's VeraConfig/OFTConfig): the adapted layers' biases train
with the adapter and travel in its file, both ways with PEFT."""

import pytest
import torch

from loratune.adapters import add_adapter, load_adapter, save_adapter
from loratune.config import OFTConfig, VeraConfig
from tiny import tiny_llama

peft = pytest.importorskip("peft")
IDS = torch.tensor([[3, 7, 11, 2, 64, 99, 5]])
TARGETS = ["q_proj", "down_proj"]
METHODS = {
    "vera": (VeraConfig, lambda **kw: peft.VeraConfig(r=8, **kw), "vera_only"),
    "oft": (OFTConfig, lambda **kw: peft.OFTConfig(r=0, oft_block_size=8, **kw), "oft_only"),
}


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def trained_biases(named) -> set[str]:
    return {n.replace("base_model.model.", "") for n, p in named if p.requires_grad
            and n.endswith(".bias")}


@pytest.mark.parametrize("method", METHODS)
def test_layer_biases_train_and_travel_like_peft(tmp_path, method):
    ours_cls, theirs_cls, only = METHODS[method]
    theirs = peft.get_peft_model(tiny_llama(bias=True), theirs_cls(
        target_modules=TARGETS, bias=only, init_weights=False))
    want = {f"model.layers.{i}.{m}.base_layer.bias" for i in (0, 1)
            for m in ("self_attn.q_proj", "mlp.down_proj")}
    assert trained_biases(theirs.named_parameters()) == want
    mine = tiny_llama(bias=True)
    options = {"r": 8} if method == "vera" else {"oft_block_size": 8}
    add_adapter(mine, ours_cls(target_modules=TARGETS, bias=only, **options))
    assert trained_biases(mine.named_parameters()) == want

    with torch.no_grad():  # trained: the layer biases move
        for n, p in theirs.named_parameters():
            if n.endswith(".bias") and p.requires_grad:
                p.add_(0.5)
    theirs.save_pretrained(tmp_path / "peft")
    ours = tiny_llama(bias=True)
    assert load_adapter(ours, tmp_path / "peft").bias == only
    assert (logits(theirs) - logits(tiny_llama(bias=True))).abs().max() > 1e-2
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-5, rtol=0)
    save_adapter(ours, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(tiny_llama(bias=True), tmp_path / "ours")
    torch.testing.assert_close(logits(again), logits(theirs), atol=1e-5, rtol=0)
