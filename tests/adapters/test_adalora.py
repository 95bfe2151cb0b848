"""AdaLoRA: delta math, budget schedule, pruning order, training, PEFT parity (logits, orthogonal
loss, rank allocation, rank_pattern files loading both ways)."""

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from loratune.adapters.adalora import (AdaLoraAdapter, RankAllocator, adalora_modules,
                                       adalora_peft_config, apply_rank_pattern, final_ranks,
                                       orthogonal_loss, rank_pattern)
from loratune.adapters.host import AdaptedLinear
from loratune.config import AdaLoraConfig
from loratune.models.modules import set_submodule
from tiny import tiny_llama

IDS = torch.tensor([[3, 7, 11, 2, 64, 99, 5, 17, 40, 8]])
TARGETS = ["q_proj", "v_proj"]


def ada_config(**kw):
    base = dict(init_r=6, target_r=3, total_step=12, tinit=2, tfinal=3, deltaT=2,
                lora_alpha=8, target_modules=TARGETS)
    return AdaLoraConfig(**{**base, **kw})


def add_adalora(model, config, name="default"):
    """Wrap the target linears in AdaptedLinear and give each an AdaLoRA adapter, trainable."""
    model.requires_grad_(False)
    for path, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and path.rsplit(".", 1)[-1] in config.target_modules:
            layer = AdaptedLinear(mod)
            set_submodule(model, path, layer)
            layer.adapters[name] = AdaLoraAdapter(mod.in_features, mod.out_features, config)
            layer.active = {name: 1.0}
    return model


def randomize(model, seed=1, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, ad in adalora_modules(model, "default"):
            for t in ad.file_tensors().values():
                t.copy_(torch.randn(t.shape, generator=g) * scale)
    return model


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def peft_twin(ours, config):
    """PEFT's AdaLoRA on the same base, holding our adapter's A/B/E."""
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(tiny_llama(), peft.AdaLoraConfig(
        init_r=config.init_r, target_r=config.target_r, total_step=config.total_step,
        tinit=config.tinit, tfinal=config.tfinal, deltaT=config.deltaT, lora_alpha=8,
        target_modules=TARGETS, task_type="CAUSAL_LM"))
    inner = pm.base_model.model
    with torch.no_grad():
        for path, ad in adalora_modules(ours, "default"):
            layer = inner.get_submodule(path)
            for key, t in ad.file_tensors().items():
                getattr(layer, key)["default"].copy_(t)
    return pm


def test_delta_is_b_diag_e_a_scaled_and_merges_exactly():
    cfg = ada_config(lora_alpha=4)
    ad = AdaLoraAdapter(32, 16, cfg)
    assert ad.lora_A.shape == (6, 32) and ad.lora_E.shape == (6, 1) and ad.lora_B.shape == (16, 6)
    assert ad.lora_E.abs().max() == 0  # fresh adapter: ΔW = 0
    big = AdaLoraAdapter(512, 512, ada_config(init_r=64))
    assert abs(big.lora_A.std().item() - 0.02) < 1e-3 and abs(big.lora_B.std().item() - 0.02) < 1e-3
    with torch.no_grad():
        ad.lora_E.copy_(torch.arange(1.0, 7.0).view(6, 1))
    hand = torch.zeros(16, 32)
    for i in range(6):  # sum of rank-one terms E_i · B[:, i] ⊗ A[i]
        hand += ad.lora_E[i, 0] * torch.outer(ad.lora_B[:, i], ad.lora_A[i])
    hand *= 4 / (6 + 1e-5)
    torch.testing.assert_close(ad.delta_weight(), hand.detach(), atol=1e-7, rtol=1e-5)
    x = torch.randn(2, 5, 32)
    out = ad.add_to(torch.zeros(2, 5, 16), x, 0.5)
    torch.testing.assert_close(out, 0.5 * x @ hand.detach().T, atol=1e-6, rtol=1e-5)
    w, bias = torch.randn(16, 32), torch.randn(16)
    w2, b2 = ad.merge_into(w, bias, 0.5)
    assert b2 is bias and (w2 - w - 0.5 * hand).abs().max() < 1e-6
    w3, _ = ad.unmerge_from(w2, bias, 0.5)
    assert (w3 - w).abs().max() < 1e-6


def test_logits_equal_peft_also_after_masking():
    cfg = ada_config()
    ours = randomize(add_adalora(tiny_llama(), cfg))
    pm = peft_twin(ours, cfg)
    assert (logits(ours) - logits(tiny_llama())).abs().max() > 1e-2  # the adapter matters
    assert (logits(ours) - logits(pm)).abs().max().item() < 1e-5
    mask = torch.tensor([True, False, True, True, False, False])
    for path, ad in adalora_modules(ours, "default"):
        ad.set_kept(mask)
        pm.base_model.model.get_submodule(path).lora_E["default"].data[~mask] = 0
    assert final_ranks(ours, "default") == {p: 3 for p, _ in adalora_modules(ours, "default")}
    assert (logits(ours) - logits(pm)).abs().max().item() < 1e-5
    # merged into the base weight, as PEFT merges
    for layer in ours.modules():
        if isinstance(layer, AdaptedLinear):
            layer.merge()
    assert all(layer.merged for layer in ours.modules() if isinstance(layer, AdaptedLinear))
    merged_peft = logits(pm.merge_and_unload())
    assert (logits(ours) - merged_peft).abs().max().item() < 1e-5


def test_orthogonal_loss_matches_peft():
    cfg = ada_config(orth_reg_weight=0.7)
    ours = randomize(add_adalora(tiny_llama(), cfg))
    pm = peft_twin(ours, cfg)
    pm.peft_config["default"].orth_reg_weight = 0.7
    ce = ours(input_ids=IDS, labels=IDS).loss
    reg = orthogonal_loss(ours, "default")
    assert reg.item() > 0.1
    theirs = pm(input_ids=IDS, labels=IDS).loss
    assert abs((ce + reg).item() - theirs.item()) < 1e-5


def lockstep(ours, pm, cfg, steps):
    """SGD on the same batches for both; yield (step, our pattern, PEFT's pattern)."""
    opt_o = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.05)
    opt_p = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.05)
    alloc = RankAllocator(ours, cfg, "default")
    g = torch.Generator().manual_seed(3)
    for step in range(steps):
        ids = torch.randint(0, 128, (2, 12), generator=g)
        (ours(input_ids=ids, labels=ids).loss + orthogonal_loss(ours, "default")).backward()
        pm(input_ids=ids, labels=ids).loss.backward()
        opt_o.step()
        opt_p.step()
        changed = alloc.update_and_allocate(ours, "default", step)
        pm.base_model.update_and_allocate(step)
        opt_o.zero_grad()
        opt_p.zero_grad()
        theirs = {k.removesuffix(".default"): v
                  for k, v in (pm.peft_config["default"].rank_pattern or {}).items()}
        yield step, alloc, changed, rank_pattern(ours, "default"), theirs


def test_rank_allocation_matches_peft_step_by_step():
    cfg = ada_config()
    ours = randomize(add_adalora(tiny_llama(), cfg), scale=0.2)
    pm = peft_twin(ours, cfg)
    compared = 0
    for step, alloc, _, mine, theirs in lockstep(ours, pm, cfg, cfg.total_step + 2):
        if theirs:
            assert mine == theirs, f"step {step}"
            compared += 1
    assert compared >= 5
    assert sum(final_ranks(ours, "default").values()) == 3 * 4
    assert (logits(ours) - logits(pm)).abs().max().item() < 1e-4


def test_budget_schedule_and_final_mask_fixed():
    cfg = ada_config(total_step=20, tinit=2, tfinal=4, deltaT=2)
    ours = randomize(add_adalora(tiny_llama(), cfg), scale=0.2)
    alloc = RankAllocator(ours, cfg, "default")
    assert (alloc.init_budget, alloc.target_budget) == (24, 12)
    # cubic: 12 + 12·(1 - (t-2)/14)³, truncated
    assert [alloc.budget(t)[0] for t in (0, 2, 3, 9, 16, 17)] == [24, 24, 21, 13, 12, 12]
    assert [alloc.budget(t)[1] for t in (2, 3, 4, 17)] == [False, False, True, True]
    opt = torch.optim.Adam([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(4)
    totals, final = [], None
    for step in range(24):
        ids = torch.randint(0, 128, (2, 12), generator=g)
        (ours(input_ids=ids, labels=ids).loss + orthogonal_loss(ours, "default")).backward()
        opt.step()
        changed = alloc.update_and_allocate(ours, "default", step)
        opt.zero_grad()
        kept = sum(final_ranks(ours, "default").values())
        totals.append(kept)
        budget, due = alloc.budget(step)
        if due or step >= 16:
            assert kept == min(budget, 24), f"step {step}"
        if step == 4:  # the first allocation
            assert changed == rank_pattern(ours, "default")
        if step == 16:
            final = rank_pattern(ours, "default")
        if step > 16:
            assert changed is None and rank_pattern(ours, "default") == final
            for _, ad in adalora_modules(ours, "default"):  # Adam moved them; masked again
                assert ad.lora_E[~ad.kept].abs().max() == 0
    assert totals[:4] == [24, 24, 24, 24] and totals[-1] == 12
    assert all(a >= b for a, b in zip(totals, totals[1:]))
    assert len(set(final_ranks(ours, "default").values())) > 1  # ranks differ between modules


def test_pruning_keeps_the_most_important_triplets():
    cfg = ada_config(init_r=4, target_r=2, total_step=10, tinit=0, tfinal=0, deltaT=1,
                     beta1=0.5, beta2=0.0)
    model = add_adalora(tiny_llama(), cfg)
    mods = adalora_modules(model, "default")
    alloc = RankAllocator(model, cfg, "default")
    # importance = |E·grad| only (A, B gradients zero); known values, all distinct
    wanted = torch.randperm(4 * len(mods), generator=torch.Generator().manual_seed(0)).float() + 1
    for i, (_, ad) in enumerate(mods):
        with torch.no_grad():
            ad.lora_E.copy_(wanted[4 * i:4 * i + 4].view(4, 1))
        ad.lora_E.grad = torch.ones(4, 1)
        ad.lora_A.grad = torch.zeros_like(ad.lora_A)
        ad.lora_B.grad = torch.zeros_like(ad.lora_B)
    budget = alloc.budget(5)[0]
    assert budget == 9  # 8 + 8·0.5³
    alloc.update_and_allocate(model, "default", 5)
    kept = torch.cat([ad.kept for _, ad in mods])
    assert kept.sum() == budget
    assert torch.equal(kept, wanted > 16 - budget)  # the `budget` largest survive
    assert all(torch.equal(ad.lora_E.view(-1) != 0, ad.kept) for _, ad in mods)


def test_training_with_orthogonal_loss_reduces_loss():
    cfg = ada_config(target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], total_step=30,
                     tinit=5, tfinal=10, deltaT=1)
    model = add_adalora(tiny_llama(), cfg)
    alloc = RankAllocator(model, cfg, "default")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    batch = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(7))
    losses, orth = [], []
    for step in range(30):
        ce = model(input_ids=batch, labels=batch).loss
        reg = orthogonal_loss(model, "default")
        (ce + reg).backward()
        opt.step()
        alloc.update_and_allocate(model, "default", step)
        opt.zero_grad()
        losses.append(ce.item())
        orth.append(reg.item())
    # E starts at zero (ΔW = 0), so the first steps move slowly: ~0.21 nats in 30 steps
    assert losses[-1] < losses[0] - 0.15, losses
    assert orth[0] > 1.0 and orth[-1] < 0.2  # P, Q pulled towards orthonormal
    assert sum(final_ranks(model, "default").values()) == 3 * 8


def pruned_model(cfg):
    model = randomize(add_adalora(tiny_llama(), cfg), scale=0.2)
    g = torch.Generator().manual_seed(9)
    for _, ad in adalora_modules(model, "default"):
        k = torch.randint(1, cfg.init_r, (1,), generator=g)
        ad.set_kept(torch.randperm(cfg.init_r, generator=g) < k)
    return model


def write_folder(folder, model, cfg, compact=True):
    folder.mkdir()
    tensors = {}
    for path, ad in adalora_modules(model, "default"):
        src = ad.saved_tensors() if compact else ad.file_tensors()
        tensors.update({f"base_model.model.{path}.{k}": t.detach().contiguous()
                        for k, t in src.items()})
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    fields = adalora_peft_config(cfg, rank_pattern(model, "default") if compact else None)
    fields.update(task_type="CAUSAL_LM", base_model_name_or_path=None, inference_mode=True)
    (folder / "adapter_config.json").write_text(json.dumps(fields))
    return tensors


def test_rank_pattern_file_loads_in_peft_and_back(tmp_path):
    peft = pytest.importorskip("peft")
    cfg = ada_config()
    model = pruned_model(cfg)
    ranks = final_ranks(model, "default")
    assert len(set(ranks.values())) > 1
    tensors = write_folder(tmp_path / "ad", model, cfg)
    q0 = "base_model.model.model.layers.0.self_attn.q_proj"
    assert tensors[f"{q0}.lora_A"].shape == (ranks["model.layers.0.self_attn.q_proj"], 32)
    raw = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert raw["peft_type"] == "ADALORA" and raw["rank_pattern"] == rank_pattern(model, "default")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ad")
    for path, r in ranks.items():
        assert theirs.base_model.model.get_submodule(path).lora_A["default"].shape[0] == r
    assert (logits(theirs) - logits(model)).abs().max().item() < 1e-5
    # back into ours: compact modules take the file's rows, same logits
    mine = add_adalora(tiny_llama(), cfg)
    apply_rank_pattern(mine, "default", raw["rank_pattern"], tensors)
    assert final_ranks(mine, "default") == ranks
    with torch.no_grad():
        for path, ad in adalora_modules(mine, "default"):
            for k, t in ad.file_tensors().items():
                t.copy_(tensors[f"base_model.model.{path}.{k}"])
    assert (logits(mine) - logits(model)).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="pruned rows"):
        RankAllocator(mine, cfg, "default")


def test_full_size_file_without_pattern_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    cfg = ada_config()
    model = pruned_model(cfg)
    write_folder(tmp_path / "full", model, cfg, compact=False)
    raw = json.loads((tmp_path / "full" / "adapter_config.json").read_text())
    assert raw["rank_pattern"] is None
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "full")
    assert (logits(theirs) - logits(model)).abs().max().item() < 1e-5


def test_clear_errors():
    cfg = ada_config()
    model = add_adalora(tiny_llama(), cfg)
    with pytest.raises(ValueError, match="total_step"):
        RankAllocator(model, ada_config(total_step=None), "default")
    with pytest.raises(ValueError, match="no budgeting phase"):
        RankAllocator(model, ada_config(total_step=5, tinit=3, tfinal=2), "default")
    with pytest.raises(ValueError, match="no AdaLoRA adapter named 'other'"):
        RankAllocator(model, cfg, "other")
    with pytest.raises(ValueError, match=r"q_proj\.lora_A has no gradient"):
        RankAllocator(model, cfg, "default").update_and_allocate(model, "default", 3)
    with pytest.raises(ValueError, match="names no AdaLoRA module"):
        apply_rank_pattern(model, "default", {"model.nope.lora_E": [True] * 6})
    with pytest.raises(ValueError, match="expected init_r=6"):
        apply_rank_pattern(model, "default", {"model.layers.0.self_attn.q_proj.lora_E": [True]})
