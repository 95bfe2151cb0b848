"""LoRA on GPT-OSS's routed experts (issue 30): `GptOssExperts` stores gate_up_proj [E, H, 2I]
and down_proj [E, I, H] transposed (x @ W), with per-expert biases, gate and up interleaved by
column and a clamped SwiGLU. The per-expert A/B follow PEFT 0.21's ParamWrapper for a
parameter stored [E, in, out] (A [E·r, in], B [out, r·E], delta[e] = s·(B_e·A_e)ᵀ), and the
oracles are transformers' eager experts on W + delta and PEFT's own target_parameters."""

import copy
import math

import pytest
import torch
from safetensors.torch import load_file

from families import family_tokenizer
from loratune.adapters import add_adapter, load_adapter, save_adapter
from loratune.adapters.expert_lora import ExpertHost
from loratune.adapters.inject import merge_and_unload, trainable_parameters
from loratune.config import LoraConfig, ModelConfig, QuantConfig
from loratune.export.merge import merge_folder, read_adapters
from loratune.models import load_model
from loratune.models.moe_experts import QuantizedExperts
from tests.models.test_moe_families import build_moe, logits, nf4_round_trip_experts, train_moe

E, H, I, R = 4, 32, 16, 2  # build_moe("gpt_oss"): 4 experts, hidden 32, intermediate 16


def gpt_oss(seed: int = 0):
    """The tiny GPT-OSS with random expert biases (the class starts them at zero)."""
    model, _ = build_moe("gpt_oss", seed)
    g = torch.Generator().manual_seed(seed + 11)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("_proj_bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def randomize(model, seed: int = 1, scale: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in trainable_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def peft_delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """PEFT 0.21 ParamWrapper.get_delta_weight for a parameter stored [E, in, out]."""
    return torch.einsum("o r e, e r i -> e i o", b.view(b.shape[0], R, E),
                        a.view(E, R, a.shape[-1])) * scale


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpt_oss") / "model"
    gpt_oss().save_pretrained(out)
    family_tokenizer("qwen3").save_pretrained(out)
    return out


def test_gpt_oss_experts_take_per_expert_lora_in_peft_layout():
    model = gpt_oss()
    targets = add_adapter(model, LoraConfig(r=R, target_modules=["experts"]))
    assert targets == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    ad = model.model.layers[0].mlp.experts.adapters["default"]
    # in/out of the stored [E, in, out] parameter, as PEFT's ParamWrapper reads them
    assert ad.gate_up_proj_A.shape == (E * R, H) and ad.gate_up_proj_B.shape == (2 * I, R * E)
    assert ad.down_proj_A.shape == (E * R, I) and ad.down_proj_B.shape == (H, R * E)
    trainable = {n for n, _ in trainable_parameters(model)}
    assert not any("router" in n or "_bias" in n for n in trainable)


@pytest.mark.parametrize("grouping", ["grouped_mm", "loop"])
def test_host_equals_eager_experts_on_w_plus_delta_forward_and_grads(grouping):
    """Our grouped forward (biases, interleaved clamped SwiGLU) equals transformers' eager
    GptOssExperts run on W + PEFT's delta: output, and gradients of x, A and B (1e-5)."""
    model = gpt_oss()
    mlp = model.model.layers[0].mlp
    eager = copy.deepcopy(mlp.experts)
    eager.config._experts_implementation = "eager"
    add_adapter(model, LoraConfig(r=R, lora_alpha=4, target_modules=["experts"]))
    randomize(model, scale=0.1)  # outputs of order 1: 1e-5 is a tight bound
    host, ad = mlp.experts, mlp.experts.adapters["default"]
    host.grouping = grouping
    x = torch.randn(12, H, generator=torch.Generator().manual_seed(4)) * 3  # some clamping
    with torch.no_grad():
        _, weights, index = mlp.router(x)
    ours_x, ref_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref_ab = {k: getattr(ad, k).detach().clone().requires_grad_() for k in
              ("gate_up_proj_A", "gate_up_proj_B", "down_proj_A", "down_proj_B")}
    params = {p: getattr(eager, p) + peft_delta(ref_ab[p + "_A"], ref_ab[p + "_B"], 2.0)
              for p in ("gate_up_proj", "down_proj")}
    ref = torch.func.functional_call(eager, params, (ref_x, index, weights))
    out = host(ours_x, index, weights)
    assert (ref - eager(x, index, weights)).abs().max() > 1e-3  # the adapter counts
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    (out * probe).sum().backward()
    (ref * probe).sum().backward()
    torch.testing.assert_close(ours_x.grad, ref_x.grad, atol=1e-5, rtol=0)
    for k, t in ref_ab.items():
        torch.testing.assert_close(getattr(ad, k).grad, t.grad, atol=1e-5, rtol=0)


def test_logits_equal_hand_merged_model_and_merge_and_unload():
    """Adapted logits equal the base's with W_e + s·(B_e·A_e)ᵀ written into the stored
    [E, in, out] tensors by hand; merge_and_unload folds it there (1e-5)."""
    model = gpt_oss()
    add_adapter(model, LoraConfig(r=R, lora_alpha=4, target_modules=["experts"]))
    randomize(model)
    adapted = logits(model)
    reference = gpt_oss()
    with torch.no_grad():
        for i, layer in enumerate(reference.model.layers):
            ad = model.model.layers[i].mlp.experts.adapters["default"]
            for p in ("gate_up_proj", "down_proj"):
                a, b = getattr(ad, p + "_A").view(E, R, -1), getattr(ad, p + "_B").view(-1, R, E)
                for e in range(E):
                    getattr(layer.mlp.experts, p)[e] += 2.0 * (b[:, :, e] @ a[e]).T
    assert (adapted - logits(gpt_oss())).abs().max() > 1e-3
    torch.testing.assert_close(adapted, logits(reference), atol=1e-5, rtol=0)
    merged = merge_and_unload(model)
    assert type(merged.model.layers[0].mlp.experts).__name__ == "GptOssExperts"
    torch.testing.assert_close(logits(merged), adapted, atol=1e-5, rtol=0)


def test_peft_loads_our_gpt_oss_folder_with_equal_logits(tmp_path):
    from peft import PeftModel

    model = gpt_oss()
    add_adapter(model, LoraConfig(r=R, lora_alpha=8, target_modules=["q_proj", "experts"]))
    randomize(model)
    save_adapter(model, tmp_path / "a")
    peft_model = PeftModel.from_pretrained(gpt_oss(), tmp_path / "a").eval()
    assert (logits(model) - logits(gpt_oss())).abs().max() > 1e-3
    torch.testing.assert_close(logits(peft_model), logits(model), atol=1e-5, rtol=0)


def test_we_load_peft_gpt_oss_folder_with_equal_logits(tmp_path):
    from tests.adapters.test_expert_lora import peft_made

    peft_model = peft_made(gpt_oss(), tmp_path / "p", r=R)
    model = gpt_oss()
    load_adapter(model, tmp_path / "p")
    assert isinstance(model.model.layers[1].mlp.experts, ExpertHost)
    assert (logits(model) - logits(gpt_oss())).abs().max() > 1e-3
    torch.testing.assert_close(logits(model), logits(peft_model.eval()), atol=1e-5, rtol=0)


def train_experts(folder, tmp_path, steps=6, quant=False):
    return train_moe(folder, tmp_path, ["experts"], quant=quant, steps=steps, rows=2)


def test_train_gpt_oss_experts_loss_falls_reload_and_merge_folder(folder, tmp_path):
    """`train` with LoRA on GPT-OSS's experts alone: the loss falls; the saved adapter reloads
    (ours and PEFT's loaders agree, 1e-5); the merged folder, loaded by transformers, gives the
    adapted logits (1e-4)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = train_experts(folder, tmp_path)
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.1, losses
    base, _ = load_model(str(folder))
    before = logits(base)
    load_adapter(base, result.adapter_dir)
    adapted = logits(base)
    assert (adapted - before).abs().max() > 1e-3
    peft = PeftModel.from_pretrained(load_model(str(folder))[0], result.adapter_dir).eval()
    torch.testing.assert_close(logits(peft), adapted, atol=1e-5, rtol=0)
    merged = merge_folder(folder, read_adapters([result.adapter_dir], None), tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(merged.out, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(again), adapted, atol=1e-4, rtol=0)


def test_qlora_gpt_oss_experts_with_lora_equal_dequantized_base_plus_lora(folder, tmp_path):
    """The 4-bit GPT-OSS experts (QuantizedExperts, transposed, biased) host the expert LoRA:
    logits equal the fp32 model whose weights took the same NF4 round trip + the same adapter
    (1e-5); `train` with QLoRA on it runs; `merge --qlora nf4` gives the 4-bit model's logits."""
    from transformers import AutoModelForCausalLM

    from loratune.cli import main

    source = gpt_oss()
    add_adapter(source, LoraConfig(r=R, lora_alpha=4, target_modules=["experts"]))
    randomize(source)
    save_adapter(source, tmp_path / "a")
    q, _ = load_model(ModelConfig(name=str(folder), quantization=QuantConfig(type="nf4")))
    before = logits(q)
    load_adapter(q, tmp_path / "a")
    hosts = [m for m in q.modules() if isinstance(m, ExpertHost)]
    assert hosts and all(isinstance(h.base_layer, QuantizedExperts) and h.base_layer.transposed
                         for h in hosts)
    adapted = logits(q)
    assert (adapted - before).abs().max() > 1e-3
    oracle = nf4_round_trip_experts(load_model(str(folder))[0])
    load_adapter(oracle, tmp_path / "a")
    torch.testing.assert_close(adapted, logits(oracle), atol=1e-5, rtol=0)
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(folder), "--adapter", str(tmp_path / "a"),
                 "--out", str(out), "--qlora", "nf4"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(merged), adapted, atol=1e-4, rtol=0)
    trained = train_experts(folder, tmp_path / "qlora", steps=2, quant=True)
    assert all(math.isfinite(h["loss"]) for h in trained.history if "loss" in h)
    saved = load_file(trained.adapter_dir / "adapter_model.safetensors")
    moved = [t for k, t in saved.items() if k.endswith("experts.lora_B.weight")]
    assert moved and all(t.abs().max() > 0 for t in moved)  # B starts at zero


def test_interleaved_experts_of_unknown_activation_are_refused_by_name():
    """Interleaved gate/up without GPT-OSS's alpha/limit: we would not know the math, so
    'experts' is refused naming the module, not skipped or guessed."""
    from loratune.adapters.registry import AdapterError

    model = gpt_oss()
    for layer in model.model.layers:
        del layer.mlp.experts.alpha
    with pytest.raises(AdapterError, match=r"model.layers.0.mlp.experts \(GptOssExperts\), "
                                           r"whose gate/up activation loratune does not know"):
        add_adapter(model, LoraConfig(r=R, target_modules=["experts"]))



def test_engine_serves_gpt_oss_expert_lora_past_its_sliding_window(tmp_path):
    """GPT-OSS's sliding layers send the engine to its DynamicCache (the slot cache refuses
    them) and its sinks stay inside transformers' attention: with a 4-token window, shorter
    than most contexts here, base and expert-LoRA requests in one batch give generate()'s
    tokens from the base and from the adapter's own model."""
    from transformers import AutoModelForCausalLM

    from loratune.serve.engine import Engine
    from loratune.serve.pool import AdapterPool
    from loratune.serve.types import GenerationRequest, SamplingParams
    from tests.models.test_moe_families import moe_config
    from tests.serve.test_serve_moe import PROMPTS, greedy

    tok = family_tokenizer("qwen3")
    cfg = moe_config("gpt_oss", tok)
    cfg.sliding_window = 4

    def build():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    model = build()
    refs = {(None, j): greedy(model, p) for j, p in enumerate(PROMPTS)}
    add_adapter(model, LoraConfig(r=R, lora_alpha=4, target_modules=["experts"]), "ex")
    randomize(model)
    save_adapter(model, tmp_path / "ex", "ex")
    refs.update({("ex", j): greedy(model, p) for j, p in enumerate(PROMPTS)})
    assert any(refs[("ex", j)] != refs[(None, j)] for j in range(len(PROMPTS)))
    engine = Engine(build(), tok, AdapterPool(tmp_path, max_adapters=1),
                    base_name="tiny-gpt-oss", max_completion_tokens=64)
    engine.eos = set()
    try:
        engine.start()
        handles = [((n, j), engine.submit(GenerationRequest(
            PROMPTS[j], {n: 1.0} if n else {}, SamplingParams(max_tokens=10))))
            for n in (None, "ex") for j in range(len(PROMPTS))]
        for key, handle in handles:
            assert handle.result().token_ids == refs[key], key
    finally:
        engine.stop()
