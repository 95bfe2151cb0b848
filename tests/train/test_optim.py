import pytest
import torch

from loratune.adapters import add_adapter
from loratune.config import LoraConfig, TrainConfig
from loratune.train.optim import build_optimizer, set_lr
from loratune.train.schedule import lr_factor
from tiny import tiny_llama


def test_schedules():
    assert [lr_factor(s, 10, 2, "cosine") for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, 10, 2, "cosine") == pytest.approx(1.0)
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)
    assert lr_factor(6, 10, 2, "linear") == pytest.approx(0.5)
    assert lr_factor(9, 10, 0, "constant") == 1.0
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_factor(1, 10, 0, "step")


def test_loraplus_gives_B_its_own_lr():
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"]))
    opt = build_optimizer(model, TrainConfig(lr=1e-4, loraplus_lr_ratio=16))
    names = {id(p): n for n, p in model.named_parameters()}
    a_group, b_group = opt.param_groups
    assert all(names[id(p)].endswith("lora_A") for p in a_group["params"])
    assert all(names[id(p)].endswith("lora_B") for p in b_group["params"])
    set_lr(opt, 0.5)
    assert a_group["lr"] == pytest.approx(5e-5) and b_group["lr"] == pytest.approx(8e-4)


def test_dropout_only_in_training():
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=4, lora_dropout=0.5, target_modules=["q_proj"]))
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.adapters["default"].lora_B.fill_(0.3)
    x = torch.randn(4, 32)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


SAVE_EMBEDDINGS = ["embed_tokens", "lm_head"]


def test_embedding_lr_is_its_own_group():
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"],
                                  modules_to_save=SAVE_EMBEDDINGS))
    names = {id(p): n for n, p in model.named_parameters()}
    lora, embeddings = build_optimizer(model, TrainConfig(lr=1e-4, embedding_lr=2e-5)).param_groups
    assert all("lora_" in names[id(p)] for p in lora["params"]) and len(lora["params"]) == 4
    assert sorted(names[id(p)] for p in embeddings["params"]) == [
        "lm_head.copies.default.weight", "model.embed_tokens.copies.default.weight"]
    assert embeddings["lr"] == 2e-5 and embeddings["base_lr"] == 2e-5
    (one,) = build_optimizer(model, TrainConfig(lr=1e-4)).param_groups  # unset: the lr of all
    assert len(one["params"]) == 6


def test_tied_embeddings_train_as_one(tmp_path):
    from loratune.adapters import load_adapter, save_adapter

    model = tiny_llama(tie=True)
    add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"],
                                  modules_to_save=SAVE_EMBEDDINGS))
    embed, head = model.model.embed_tokens.copies.default, model.lm_head.copies.default
    assert head.weight is embed.weight  # one matrix, as in the base
    (group, emb) = build_optimizer(model, TrainConfig(lr=1e-3, embedding_lr=1e-2)).param_groups
    assert len(emb["params"]) == 1
    x = torch.tensor([[1, 2, 3, 4]])
    model(input_ids=x, labels=x).loss.backward()
    torch.optim.SGD(emb["params"], lr=1.0).step()
    assert torch.equal(head.weight, embed.weight)
    save_adapter(model, tmp_path / "a")
    fresh = tiny_llama(tie=True)
    load_adapter(fresh, tmp_path / "a")
    assert fresh.lm_head.copies.default.weight is fresh.model.embed_tokens.copies.default.weight
    torch.testing.assert_close(fresh(input_ids=x).logits, model(input_ids=x).logits)
