"""EVA (init_lora_weights: eva): PEFT's initialize_lora_eva_weights is the oracle — same model,
same batches -> the same ranks and the same A (up to each component's sign), and the file we
save loads in PEFT with equal logits."""

import itertools
import json

import pytest
import torch

from loratune.adapters import add_adapter, load_adapter, save_adapter
from loratune.adapters.host import adapted_layers
from loratune.adapters.peft_format import canonical_path
from loratune.config import LoraConfig
from loratune.train.method_hooks import method_hooks
from tiny import tiny_llama, train_tiny

peft = pytest.importorskip("peft")
from peft.tuners.lora.eva import initialize_lora_eva_weights  # noqa: E402

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NO_SHARED_INPUT = ["q_proj", "o_proj", "down_proj"]


def batches(n=6, rows=2, tokens=24, seed=5):
    """Padded rows (attention_mask 0 at the end) with prompt positions labelled -100."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 128, (rows, tokens), generator=g)
        mask = torch.ones_like(ids)
        mask[1, -5:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :4] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def ours(data, targets, r=4, **eva):
    model = tiny_llama()
    config = LoraConfig(r=r, lora_alpha=8, init_lora_weights="eva", eva_config=eva,
                        target_modules=targets)
    add_adapter(model, config)
    method_hooks(model, config, "default", 1).before_training(itertools.cycle(data))
    return model


def theirs(data, targets, r=4, **eva):
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(
        r=r, lora_alpha=8, init_lora_weights="eva", eva_config=peft.EvaConfig(**eva),
        target_modules=targets))
    initialize_lora_eva_weights(pm, dataloader=data, show_progress_bar=False)
    return pm


def their_layers(pm) -> dict:
    return {name.replace("base_model.model.", ""): m for name, m in pm.named_modules()
            if hasattr(m, "lora_A") and "default" in m.lora_A}


def assert_same_as_peft(model, pm):
    mine = {p: l.adapters["default"] for p, l in adapted_layers(model) if "default" in l.adapters}
    ref = their_layers(pm)
    assert sorted(mine) == sorted(ref)
    for path, ad in mine.items():
        a, b = ad.lora_A.detach(), ref[path].lora_A["default"].weight.detach()
        assert a.shape == b.shape, path
        signs = torch.sign((a * b).sum(1, keepdim=True))  # each component's sign may differ
        torch.testing.assert_close(a * signs, b, atol=1e-5, rtol=0)
        assert ad.scaling == pytest.approx(ref[path].scaling["default"], abs=1e-7)
        assert torch.count_nonzero(ad.lora_B) == 0


@pytest.mark.parametrize("targets,eva", [
    (ALL, {"tau": 0.9}),
    (ALL, {"tau": 0.95, "rho": 1.0, "use_label_mask": False}),
    (NO_SHARED_INPUT, {"tau": 0.9, "whiten": True, "adjust_scaling_factors": False}),
])
def test_components_and_ranks_equal_peft(targets, eva):
    data = batches()
    model, pm = ours(data, targets, **eva), theirs(data, targets, **eva)
    assert_same_as_peft(model, pm)
    ranks = [a.r for _, l in adapted_layers(model) for a in l.adapters.values()]
    assert sum(ranks) == 4 * 2 * len(targets)  # the budget: r per targeted layer (2 blocks)
    assert (max(ranks) > 4) == (eva.get("rho", 2.0) > 1)  # rho 1: every layer keeps r


def test_our_file_loads_in_peft_and_ours_with_equal_logits(tmp_path):
    data = batches()
    model = ours(data, ALL, tau=0.9)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # stand-in for training: B moves off 0
        for _, layer in adapted_layers(model):
            for ad in layer.adapters.values():
                ad.lora_B.copy_(torch.randn(ad.lora_B.shape, generator=g) * 0.3)
    ids = data[0]["input_ids"]
    with torch.no_grad():
        want = model(input_ids=ids).logits
        assert (want - tiny_llama()(input_ids=ids).logits).abs().max() > 1e-2
    save_adapter(model, tmp_path / "ad")
    saved = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "eva" and saved["eva_config"]["tau"] == 0.9
    paths = sorted(canonical_path(p) for p, l in adapted_layers(model) if "default" in l.adapters)
    assert saved["target_modules"] == paths
    assert saved["rank_pattern"]  # EVA's ranks differ from r
    pm = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ad")
    mine = tiny_llama()
    load_adapter(mine, tmp_path / "ad")
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(mine(input_ids=ids).logits, want, atol=1e-5, rtol=0)


def test_eva_runs_in_train_on_the_runs_own_batches(tmp_path, data_file, smol_tokenizer):
    """train() hands the run's micro-batches to EVA before the optimizer is built: the saved
    adapter has EVA's ranks, and equals the trained model when loaded on a fresh base."""
    model, result = train_tiny(tmp_path, data_file, smol_tokenizer, {
        "r": 4, "lora_alpha": 8, "init_lora_weights": "eva", "eva_config": {"tau": 0.9}})
    ranks = {p: a.r for p, l in adapted_layers(model) for a in l.adapters.values()}
    assert sum(ranks.values()) == 4 * 2 * len(ALL) and len(set(ranks.values())) > 1, ranks
    saved = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == {canonical_path(p): r for p, r in ranks.items() if r != 4}
