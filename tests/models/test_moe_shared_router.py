"""Mixture-of-experts cases issue 30 asked for and no test held: LoRA on DeepSeek's shared
experts against PEFT both ways, OLMoE trained end to end with LoRA on its routed experts, and a
router trained whole (modules_to_save) keeping transformers' load-balancing loss in the loss."""

import json
import math

import pytest
import torch
from families import family_conversation

from loratune.adapters import add_adapter, load_adapter, save_adapter
from loratune.adapters.expert_lora import ExpertHost
from loratune.adapters.inject import trainable_parameters
from loratune.config import LoraConfig, build_config
from loratune.export.merge import merge_folder, read_adapters
from loratune.models import load_model
from loratune.train import train
from loratune.train.loss import causal_lm_loss
from loratune.train.method_hooks import method_hooks
from loratune.train.router_balance import RouterBalance
from tests.models.test_moe_families import MOE, build_moe, logits

SHARED = ["gate_proj", "up_proj", "down_proj"]


def randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n or p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.fixture
def peft_without_v4_conversion(monkeypatch):
    """PEFT 0.21 rewrites every target ending in gate_proj/up_proj/down_proj of a DeepSeek,
    Qwen3-MoE or OLMoE model into the fused routed experts' target_parameters, as if the file
    came from transformers 4 (peft#3711, fix in peft#3715): shared experts' LoRA is then
    dropped. This turns that conversion off, as the fix does for dotted current-model paths."""
    import peft.utils.transformers_weight_conversion as conversion

    monkeypatch.setattr(conversion, "convert_peft_config_for_transformers",
                        lambda *args, **kwargs: None)


@pytest.mark.parametrize("name", ["deepseek_v2", "deepseek_v3"])
def test_shared_experts_lora_loads_in_peft_and_back_with_equal_logits(
        name, tmp_path, peft_without_v4_conversion):
    """'shared_experts' picks exactly the shared MLP's linears (not layer 0's dense MLP of the
    same leaf names); PEFT loads our file with equal logits (1e-5), and we load PEFT's."""
    from peft import LoraConfig as PeftLora, PeftModel, get_peft_model

    model = build_moe(name)[0]
    base = logits(model)
    targets = add_adapter(model, LoraConfig(r=2, lora_alpha=4,
                                            target_modules=["q_a_proj", "shared_experts"]))
    assert targets[-3:] == [f"model.layers.1.mlp.shared_experts.{p}" for p in SHARED]
    assert not any(".mlp.gate_proj" in t for t in targets)
    randomize(model)
    ours = logits(model)
    assert (ours - base).abs().max() > 1e-3
    save_adapter(model, tmp_path / "ours")
    peft_model = PeftModel.from_pretrained(build_moe(name)[0], tmp_path / "ours").eval()
    torch.testing.assert_close(logits(peft_model), ours, atol=1e-5, rtol=0)

    peft_made = get_peft_model(build_moe(name)[0], PeftLora(
        r=2, lora_alpha=4, target_modules=[f"shared_experts.{p}" for p in SHARED]))
    randomize(peft_made, seed=2)
    peft_made.save_pretrained(tmp_path / "peft")
    fresh = build_moe(name)[0]
    load_adapter(fresh, tmp_path / "peft")
    assert (logits(fresh) - base).abs().max() > 1e-3
    torch.testing.assert_close(logits(fresh), logits(peft_made.eval()), atol=1e-5, rtol=0)


def test_installed_peft_still_drops_shared_experts_lora(tmp_path):
    """peft#3711 as the installed PEFT has it: our shared-experts file loads with that LoRA
    dropped (the base's logits). When this fails, PEFT fixed it: drop the fixture above."""
    from peft import PeftModel

    model = build_moe("deepseek_v3")[0]
    base = logits(model)
    add_adapter(model, LoraConfig(r=2, target_modules=["shared_experts"]))
    randomize(model)
    with pytest.warns(UserWarning, match=r"shared_experts.down_proj \(3 such targets\): PEFT "
                                         r"0.21 .* deepseek_v3 .*peft#3711"):
        save_adapter(model, tmp_path / "ours")
    with pytest.warns(UserWarning, match="missing adapter keys"):
        peft_model = PeftModel.from_pretrained(build_moe("deepseek_v3")[0], tmp_path / "ours")
    torch.testing.assert_close(logits(peft_model.eval()), base, atol=1e-6, rtol=0)


def write_chat(tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": family_conversation(True)}) + "\n"
                            for _ in range(4)))
    return data


def run_config(folder, tmp_path, name, adapter, steps=2):
    return build_config({
        "output_dir": str(tmp_path / "run"), "model": {"name": str(folder)},
        "adapter": {"method": "lora", "r": 4, **adapter},
        "data": {"train": str(write_chat(tmp_path)), "max_length": 128},
        "train": {"max_steps": steps, "batch_size": 2, "lr": 5e-2, "warmup_ratio": 0.0}})


def save_base(name, tmp_path):
    model, tok = build_moe(name)
    folder = tmp_path / "base"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_olmoe_trains_expert_lora_end_to_end(tmp_path):
    """OLMoE through `train` with LoRA on attention and the routed experts: the experts'
    tensors train, the folder reloads into a fresh base with the run's logits, and the merged
    folder loaded by transformers gives them too (1e-4)."""
    from transformers import AutoModelForCausalLM

    folder = save_base("olmoe", tmp_path)
    result = train(run_config(folder, tmp_path, "olmoe",
                              {"target_modules": MOE["olmoe"][1] + ["experts"]}), quiet=True)
    assert all(math.isfinite(h["loss"]) for h in result.history)
    live, _ = load_model(str(folder))
    before = logits(live)
    load_adapter(live, result.adapter_dir)
    hosts = [m for m in live.modules() if isinstance(m, ExpertHost)]
    assert len(hosts) == 2 and all(h.adapters["default"].down_proj_B.abs().max() > 0
                                   for h in hosts)
    adapted = logits(live)
    for h in hosts:  # the experts' own share of the change
        h.disabled = True
    assert (adapted - logits(live)).abs().max() > 1e-4
    for h in hosts:
        h.disabled = False
    assert (adapted - before).abs().max() > 1e-4
    merged = merge_folder(folder, read_adapters([result.adapter_dir], None), tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(merged.out, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(again), adapted, atol=1e-4, rtol=0)


def batch_of(tok):
    ids = tok(["the answer is 42", "Paris is the capital of France. Hello"], padding=True,
              return_tensors="pt")
    labels = ids.input_ids.masked_fill(ids.attention_mask == 0, -100)
    return {"input_ids": ids.input_ids, "attention_mask": ids.attention_mask, "labels": labels}


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral", "olmoe"])
def test_router_in_modules_to_save_adds_transformers_balance_loss(name):
    """With the router trained whole, each micro-batch's extra loss is router_aux_loss_coef
    times the aux_loss transformers' own forward reports for the same batch (its
    load_balancing_loss_func over the router logits, padding masked), and it reaches the
    router's gradient; a frozen router gets no such term."""
    model, tok = build_moe(name)
    tok.padding_side = "right"
    cfg = LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["gate"])
    add_adapter(model, cfg)
    hooks = method_hooks(model, cfg, "default", 10)
    assert isinstance(hooks, RouterBalance)
    model.train()
    batch = batch_of(tok)
    causal_lm_loss(model, batch)
    extra = hooks.micro_loss()
    want = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 output_router_logits=True).aux_loss * model.config.router_aux_loss_coef
    assert float(want) > 0
    torch.testing.assert_close(extra, want, atol=1e-6, rtol=1e-6)
    extra.backward()
    routers = [p for n, p in trainable_parameters(model) if ".gate." in n]
    assert routers and all(p.grad is not None and p.grad.abs().max() > 0 for p in routers)

    frozen = build_moe(name)[0]
    plain = LoraConfig(r=2, target_modules=["q_proj"])
    add_adapter(frozen, plain)
    assert not isinstance(method_hooks(frozen, plain, "default", 10), RouterBalance)


def test_training_the_router_reports_the_balance_loss(tmp_path):
    """Through `train`: the steps log the balance term as extra_loss (> 0) and the router's
    copy moves."""
    folder = save_base("qwen3_moe", tmp_path)
    result = train(run_config(folder, tmp_path, "qwen3_moe",
                              {"target_modules": ["q_proj"], "modules_to_save": ["gate"]}),
                   quiet=True)
    assert all(h.get("extra_loss", 0) > 0 for h in result.history), result.history


def test_a_second_adapter_on_the_experts_joins_their_host(tmp_path):
    """Experts wrapped by a first adapter's host still match 'experts' for a second one (they
    were silently left out of it: its file held no expert tensors)."""
    model = build_moe("qwen3_moe")[0]
    add_adapter(model, LoraConfig(r=4, target_modules=["experts"]), "first")
    targets = add_adapter(model, LoraConfig(r=2, target_modules=["o_proj", "experts"]), "second")
    assert targets[-2:] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    host = model.model.layers[0].mlp.experts
    assert isinstance(host, ExpertHost) and list(host.adapters) == ["first", "second"]
    save_adapter(model, tmp_path / "second", "second")
    raw = json.loads((tmp_path / "second" / "adapter_config.json").read_text())
    assert raw["target_parameters"] == ["experts.gate_up_proj", "experts.down_proj"]


def test_no_peft_note_where_peft_reads_the_file_right(tmp_path):
    """Attention and routed experts only: PEFT's conversion leaves them be, nothing is said."""
    import warnings

    model = build_moe("qwen3_moe")[0]
    add_adapter(model, LoraConfig(r=2, target_modules=["q_proj", "experts"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_adapter(model, tmp_path / "a")
