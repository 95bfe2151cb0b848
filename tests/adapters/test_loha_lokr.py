"""LoHa and LoKr against PEFT's own implementation: same factors give the same logits and
gradients (fp32, 1e-5), files go both ways, merge is exact, the dropouts do what PEFT's do."""

import json
import subprocess
import sys

import pytest
import torch

from loratune.adapters import (add_adapter, load_adapter, merge, save_adapter, set_active,
                               unmerge)
from loratune.adapters.host import adapted_layers
from loratune.adapters.lokr import factorization
from loratune.config import LoHaConfig, LoKrConfig, build_config
from tiny import tiny_llama

peft = pytest.importorskip("peft")
IDS = torch.tensor([[3, 7, 11, 2, 64, 99, 5]])

# (ours, PEFT's) with the same options: r=8 on tiny_llama's 32/64-wide layers keeps LoKr's W2
# whole (r ≥ half its side), r=2 splits it (and W1 too with decompose_both).
PAIRS = {
    "loha": (LoHaConfig(r=4, alpha=6), dict(r=4, alpha=6)),
    "loha_q_down": (LoHaConfig(r=2, alpha=3, target_modules=["q_proj", "down_proj"]),
                    dict(r=2, alpha=3, target_modules=["q_proj", "down_proj"])),
    "lokr": (LoKrConfig(r=8, alpha=6), dict(r=8, alpha=6)),
    "lokr_both": (LoKrConfig(r=2, alpha=6, decompose_both=True),
                  dict(r=2, alpha=6, decompose_both=True)),
    "lokr_factor": (LoKrConfig(r=1, alpha=2, decompose_factor=4, init_weights="lycoris"),
                    dict(r=1, alpha=2, decompose_factor=4, init_weights="lycoris")),
}
PEFT_CLASSES = {"loha": "LoHaConfig", "lokr": "LoKrConfig"}


def peft_config(method: str, options: dict):
    options = {"target_modules": "all-linear", **options}
    return getattr(peft, PEFT_CLASSES[method])(task_type="CAUSAL_LM", **options)


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def our_tensors(model, name="default") -> dict[str, torch.Tensor]:
    """`<module path>.<kind>` -> live factor."""
    return {f"{p}.{k}": t for p, l in adapted_layers(model)
            for k, t in l.adapters[name].file_tensors().items()}


def peft_tensors(pm) -> dict[str, torch.Tensor]:
    """The same names for a PEFT model's trainable factors."""
    return {n.removeprefix("base_model.model.").replace(".default", ""): p
            for n, p in pm.named_parameters() if p.requires_grad}


def randomize(tensors: dict[str, torch.Tensor], seed=1, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key in sorted(tensors):
            tensors[key].copy_(torch.randn(tensors[key].shape, generator=g) * scale)


def adapted(cfg, seed=1, **patterns):
    model = tiny_llama()
    add_adapter(model, cfg, **patterns)
    randomize(our_tensors(model), seed)
    return model


@pytest.mark.parametrize("dim", [1, 7, 24, 32, 64, 127, 128, 192, 4096, 11008])
@pytest.mark.parametrize("factor", [-1, 0, 2, 3, 4, 16])
def test_factorization_splits_as_peft_does(dim, factor):
    from peft.tuners.lokr.layer import factorization as theirs

    assert factorization(dim, factor) == theirs(dim, factor)


@pytest.mark.parametrize("cfg", [LoHaConfig(r=4), LoKrConfig(r=2, decompose_both=True),
                                 LoKrConfig(r=8, init_weights="lycoris")])
def test_fresh_adapter_changes_nothing(cfg):
    model = tiny_llama()
    add_adapter(model, cfg)
    assert our_tensors(model)  # it did place factors
    torch.testing.assert_close(logits(model), logits(tiny_llama()), atol=0, rtol=0)


@pytest.mark.parametrize("case", sorted(PAIRS))
def test_logits_and_gradients_equal_peft(case):
    """The same factors in both: logits and every factor's gradient within 1e-5 (fp32)."""
    ours_cfg, options = PAIRS[case]
    model = tiny_llama()
    add_adapter(model, ours_cfg)
    pm = peft.get_peft_model(tiny_llama(), peft_config(ours_cfg.method, options))
    ours, theirs = our_tensors(model), peft_tensors(pm)
    assert sorted(ours) == sorted(theirs)  # same factors, names and shapes
    randomize(theirs)
    with torch.no_grad():
        for key, tensor in ours.items():
            tensor.copy_(theirs[key])
    out, ref = model(input_ids=IDS, labels=IDS), pm(input_ids=IDS, labels=IDS)
    assert (ref.logits - logits(tiny_llama())).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    out.loss.backward()
    ref.loss.backward()
    for key, tensor in ours.items():
        assert theirs[key].grad.abs().max() > 0, key
        torch.testing.assert_close(tensor.grad, theirs[key].grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["loha", "lokr", "lokr_both"])
def test_ours_loads_in_peft_with_patterns(tmp_path, case):
    """Per-module ranks and alphas (PEFT's rank_pattern/alpha_pattern) survive the file."""
    cfg = PAIRS[case][0]
    model = adapted(cfg, rank_pattern={"up_proj": 1}, alpha_pattern={"o_proj": 5.0})
    assert model.model.layers[0].mlp.up_proj.adapters["default"].r == 1
    save_adapter(model, tmp_path / "ad", base_model="tiny")
    written = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert written["peft_type"] == cfg.method.upper() and written["r"] == cfg.r
    assert set(written["rank_pattern"].values()) == {1} and len(written["rank_pattern"]) == 2
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ad")
    assert type(theirs.peft_config["default"]).__name__ == PEFT_CLASSES[cfg.method]
    torch.testing.assert_close(logits(theirs), logits(model), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["loha_q_down", "lokr", "lokr_factor"])
def test_peft_saved_loads_in_ours(tmp_path, case):
    ours_cfg, options = PAIRS[case]
    options = {**options, "rank_pattern": {"q_proj": 3}, "alpha_pattern": {"down_proj": 7}}
    pm = peft.get_peft_model(tiny_llama(), peft_config(ours_cfg.method, options))
    randomize(peft_tensors(pm), seed=4)
    expected = logits(pm)
    pm.save_pretrained(tmp_path / "peft_ad")
    model = tiny_llama()
    config = load_adapter(model, tmp_path / "peft_ad")
    assert type(config) is type(ours_cfg) and config.alpha == ours_cfg.alpha
    assert model.model.layers[1].self_attn.q_proj.adapters["default"].r == 3
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=0)
    save_adapter(model, tmp_path / "again")  # and our re-save reads back in PEFT
    again = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "again")
    torch.testing.assert_close(logits(again), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["loha", "lokr_both"])
def test_merge_unmerge_and_weighted_merge(case):
    model = adapted(PAIRS[case][0])
    weights = {p: l.base_layer.weight.clone() for p, l in adapted_layers(model)}
    for weight in (1.0, 0.4):
        set_active(model, {"default": weight})
        before = logits(model)
        merge(model)
        assert all(l.merged for _, l in adapted_layers(model))
        torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=0)
        unmerge(model)
        for p, l in adapted_layers(model):
            torch.testing.assert_close(l.base_layer.weight, weights[p], atol=1e-6, rtol=0)


def test_merge_command_reads_lokr_ranks_from_the_rank_pattern(tmp_path):
    """W2 is whole at r=8 and at r=4 alike on a 32-wide layer: only rank_pattern says the
    module's scale is alpha/4, and the offline merge must use it."""
    from transformers import AutoModelForCausalLM

    from loratune.export.merge import merge_folder, read_adapters

    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    model = adapted(LoKrConfig(r=8, alpha=8), rank_pattern={"q_proj": 4})
    assert model.model.layers[0].self_attn.q_proj.adapters["default"].r == 4
    save_adapter(model, tmp_path / "ad")
    merge_folder(base, read_adapters([tmp_path / "ad"], None), tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", torch_dtype=torch.float32)
    torch.testing.assert_close(logits(merged), logits(model), atol=1e-5, rtol=0)


def layer_updates(model, x, runs):
    """The update each of `runs` training forwards of one adapted layer adds to its base."""
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        return [layer(x) - layer.base_layer(x) for _ in range(runs)]


@pytest.mark.parametrize("cfg", [LoHaConfig(r=4, module_dropout=0.5),
                                 LoKrConfig(r=2, module_dropout=0.5)])
def test_module_dropout_skips_whole_updates_in_training_only(cfg):
    model = adapted(cfg)
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    full = layer_updates(model, x, 1)[0]
    assert full.abs().max() > 1e-3
    torch.manual_seed(0)
    model.train()
    updates = layer_updates(model, x, 200)
    skipped = sum(bool((u == 0).all()) for u in updates)
    assert 70 < skipped < 130  # about half, and the rest whole
    assert all((u == 0).all() or torch.allclose(u, full, atol=1e-6) for u in updates)


@pytest.mark.parametrize("cfg, rescaled", [(LoHaConfig(r=4, rank_dropout=0.5), True),
                                           (LoKrConfig(r=2, rank_dropout=0.5), False),
                                           (LoKrConfig(r=2, rank_dropout=0.5,
                                                       rank_dropout_scale=True), True)])
def test_rank_dropout_zeroes_output_rows(cfg, rescaled):
    """Each output row of the update is dropped or kept whole; PEFT's LoHa (and LoKr with
    rank_dropout_scale) scales the kept rows by 1/(fraction kept)."""
    model = adapted(cfg)
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    full = layer_updates(model, x, 1)[0]
    torch.manual_seed(0)
    model.train()
    for update in layer_updates(model, x, 5):
        kept = (update != 0).any(dim=0)
        assert 0 < kept.sum() < 32  # some rows (output features) dropped, some kept
        factor = 32 / kept.sum().item() if rescaled else 1.0
        torch.testing.assert_close(update[:, kept], full[:, kept] * factor, atol=1e-5, rtol=1e-5)
    model.eval()
    torch.testing.assert_close(layer_updates(model, x, 1)[0], full, atol=0, rtol=0)


def test_options_parse_without_torch_and_foreign_options_are_refused():
    """`loratune train` parses its config before importing torch or the adapters package."""
    code = ("import sys; from loratune.config import build_config; "
            "c = build_config({'adapter': {'method': 'lokr', 'r': 4, 'decompose_both': True}}); "
            "assert c.adapter.decompose_both and c.adapter.lora_alpha == 8.0; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(ValueError, match=r"method 'loha' has no option 'lora_alpha' \(an option "
                                         r"of lora, dora.*Options of loha: r, alpha"):
        build_config({"adapter": {"method": "loha", "lora_alpha": 16}})
    with pytest.raises(ValueError, match="decompose_factor"):
        build_config({"adapter": {"method": "lokr", "decompose_factor": -2}})


def test_an_adapter_loaded_into_an_eval_model_runs_without_dropout(tmp_path):
    """`loratune eval` loads adapters into the eval-mode model load_model returns and never calls
    .eval() again: new hosts must follow the model's mode, or the dropouts run at inference."""
    trained = adapted(LoHaConfig(r=4, module_dropout=0.5, rank_dropout=0.5))
    save_adapter(trained, tmp_path / "ad")
    model = tiny_llama()  # in eval mode, as load_model returns it
    load_adapter(model, tmp_path / "ad")
    assert not any(m.training for m in model.modules())
    torch.manual_seed(0)
    runs = [logits(model) for _ in range(4)]
    for run in runs:
        torch.testing.assert_close(run, logits(trained), atol=0, rtol=0)
