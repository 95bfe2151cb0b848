"""Routed experts computed per expert group (models/grouped_experts.py), through the fused
experts' LoRA host and the 4-bit experts, against transformers' own experts forward (eager) on
W_e + s·B_e·A_e: PEFT's `target_parameters` math, written here from the file layout."""

import pytest
import torch
from transformers import MixtralConfig, OlmoeConfig, Qwen3MoeConfig
from transformers.models.mixtral.modeling_mixtral import MixtralExperts
from transformers.models.olmoe.modeling_olmoe import OlmoeExperts
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

from loratune.adapters.expert_lora import ExpertHost, new_expert_lora
from loratune.config import LoraConfig
from loratune.models.grouped_experts import group_tokens, grouped_linear
from loratune.models.moe_experts import quantize_experts

E, H, I, TOKENS = 8, 32, 16, 24
FAMILIES = {
    "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeExperts, dict(moe_intermediate_size=I, num_experts=E)),
    "mixtral": (MixtralConfig, MixtralExperts, dict(intermediate_size=I, num_local_experts=E)),
    "olmoe": (OlmoeConfig, OlmoeExperts, dict(intermediate_size=I, num_experts=E)),
}
PARAMS = ("gate_up_proj", "down_proj")


def experts_of(family: str):
    cfg_cls, cls, fields = FAMILIES[family]
    cfg = cfg_cls(hidden_size=H, num_experts_per_tok=3, **fields)
    cfg._experts_implementation = "eager"  # the reference: transformers' loop over experts
    torch.manual_seed(0)
    experts = cls(cfg)
    for p in PARAMS:
        torch.nn.init.normal_(getattr(experts, p), std=0.1)
    return experts.requires_grad_(False)


def with_lora(experts, r: int = 4, backend: str = "loop"):
    host = ExpertHost(experts)
    ad = new_expert_lora(LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0), "experts",
                         experts, r=r, alpha=2 * r)
    with torch.no_grad():
        for p in ad.parameters():
            p.normal_(0, 0.1)
    host.adapters["default"] = ad
    host.active = {"default": 1.0}
    host.grouping = backend
    return host, ad


def peft_form(experts, ad, x, index, weights):
    """transformers' experts forward on W + s·B_e·A_e, the delta built from PEFT's file layout:
    lora_A [E·r, in] expert-major, lora_B [out, r·E] rank-major."""
    merged = {}
    for p in PARAMS:
        a, b = getattr(ad, f"{p}_A"), getattr(ad, f"{p}_B")
        a_e = a.view(E, ad.r, a.shape[-1])
        b_e = b.view(b.shape[0], ad.r, E).permute(2, 0, 1)
        merged[p] = getattr(experts, p) + ad.scaling * b_e @ a_e
    return torch.func.functional_call(experts, merged, (x, index, weights))


def routing(tokens=TOKENS, top_k=3, experts=E, seed=2):
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
    return index, torch.rand(tokens, top_k, generator=g)


def grads(out, ad, x, seed=5):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad((out * g).sum(), [x, *ad.parameters()])


def assert_same_as_peft_form(experts, host, ad, index, weights):
    x = torch.randn(index.shape[0], H, generator=torch.Generator().manual_seed(4))
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = peft_form(experts, ad, x_ref, index, weights)
    ours = host(x_ours, index, weights)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads(ours, ad, x_ours), grads(ref, ad, x_ref)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_grouped_lora_experts_equal_transformers_with_peft_delta(family, backend):
    """Forward, and gradients of x and of every expert's A/B, top-3 of 8 experts, fp32."""
    experts = experts_of(family)
    host, ad = with_lora(experts, backend=backend)
    assert_same_as_peft_form(experts, host, ad, *routing())


def test_experts_no_token_reaches_cost_nothing_and_get_no_gradient():
    """Tokens routed to experts 1 and 5 only, some slots transformers' "no expert" index (E):
    equal to the reference, and A/B of the six idle experts get exactly zero gradient."""
    experts = experts_of("qwen3_moe")
    host, ad = with_lora(experts, backend="grouped_mm")
    index, weights = routing(tokens=10, top_k=2, experts=2)
    index = torch.tensor([1, 5])[index]
    index[::3, 1] = E
    assert_same_as_peft_form(experts, host, ad, index, weights)
    x = torch.randn(10, H)
    a_grad = torch.autograd.grad(host(x, index, weights).square().sum(), ad.gate_up_proj_A)[0]
    per_expert = a_grad.view(E, ad.r, H).abs().sum(dim=(1, 2))
    assert per_expert[[1, 5]].min() > 0
    assert per_expert[[0, 2, 3, 4, 6, 7]].max() == 0


def test_group_tokens_keeps_each_row_with_its_token_expert_and_weight():
    index, weights = routing(tokens=9, top_k=3)
    groups = group_tokens(index, weights, E)
    flat = torch.arange(27)
    token, slot = flat // 3, flat % 3
    pairs = sorted(zip(index.view(-1).tolist(), token.tolist(), weights.view(-1).tolist()))
    got = list(zip(groups.expert.tolist(), groups.token.tolist(), groups.weight.tolist()))
    assert got == pairs  # sorted by expert, tokens ascending within one, weights with them
    assert all(index[t, s] == groups.expert[i]
               for i, (t, s) in enumerate(zip(groups.order // 3, groups.order % 3)))
    assert [e - s for _, s, e in groups.spans] == torch.bincount(index.view(-1), minlength=E)[
        torch.bincount(index.view(-1), minlength=E) > 0].tolist()


def test_each_token_gets_its_own_experts_output():
    """Token by token, no grouping: out[t] = sum_k w[t,k] · expert_{index[t,k]}(x[t]).
    Fails if the grouping hands a row back to another token or another slot's weight."""
    experts = experts_of("mixtral")
    host, ad = with_lora(experts, backend="grouped_mm")
    index, weights = routing(tokens=7, top_k=3, seed=8)
    x = torch.randn(7, H)
    with torch.no_grad():
        out = host(x, index, weights)
        for t in range(7):
            want = sum(weights[t, k] * one_expert(experts, ad, int(index[t, k]), x[t])
                       for k in range(3))
            torch.testing.assert_close(out[t], want, atol=1e-5, rtol=1e-5)


def one_expert(experts, ad, e, x):
    a, b = ad.factors("gate_up_proj")
    gate, up = (experts.gate_up_proj[e] @ x + ad.scaling * b[e] @ (a[e] @ x)).chunk(2)
    h = experts.act_fn(gate) * up
    a, b = ad.factors("down_proj")
    return experts.down_proj[e] @ h + ad.scaling * b[e] @ (a[e] @ h)


def counted_grouped_mm(monkeypatch):
    calls = []
    real = torch._grouped_mm

    def counting(*args, **kwargs):
        calls.append(args[1].shape)
        return real(*args, **kwargs)
    monkeypatch.setattr(torch, "_grouped_mm", counting)
    return calls


@pytest.mark.parametrize("r,calls_expected", [(4, 6), (2, 2)])
def test_grouped_mm_runs_where_strides_allow_and_the_loop_elsewhere(monkeypatch, r,
                                                                    calls_expected):
    """fp32 on CPU: rank 4 rows are 16 bytes, so all six matmuls (base, A, B per projection)
    are grouped; rank 2 rows are 8 bytes, which grouped_mm refuses: B's falls back, and A's
    too, as its [M, 2] output's gradient would be backward's operand. Same result."""
    experts = experts_of("olmoe")
    host, ad = with_lora(experts, r=r, backend="grouped_mm")
    index, weights = routing()
    x = torch.randn(TOKENS, H)
    calls = counted_grouped_mm(monkeypatch)
    got = host(x, index, weights)
    assert len(calls) == calls_expected
    host.grouping = "loop"
    torch.testing.assert_close(got, host(x, index, weights), atol=1e-5, rtol=1e-5)
    assert len(calls) == calls_expected
    host.grouping = "auto"
    host(x, index, weights)
    assert len(calls) == 2 * calls_expected
    with torch.no_grad():  # no backward: A's grouped matmul may give 8-byte rows
        host(x, index, weights)
    assert len(calls) == 2 * calls_expected + (6 if r == 4 else 4)


def test_grouped_mm_backward_takes_a_broadcast_gradient():
    experts = experts_of("qwen3_moe")
    host, ad = with_lora(experts, backend="grouped_mm")
    host(torch.randn(TOKENS, H), *routing()).sum().backward()
    assert ad.down_proj_B.grad.abs().sum() > 0


def test_unknown_backend_is_refused_by_name():
    index, weights = routing()
    with pytest.raises(ValueError, match=r"'fast'.*'auto', 'grouped_mm', 'loop'"):
        grouped_linear(torch.randn(72, H), torch.randn(E, 4, H),
                       group_tokens(index, weights, E), "fast")


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_4bit_experts_run_only_active_experts_with_grouped_lora(backend):
    """QuantizedExperts with the fused experts' LoRA in its adapters: equal to transformers'
    forward on the dequantized weights + s·B_e·A_e, and only routed experts' 4-bit matrices run."""
    experts = experts_of("qwen3_moe")
    q = quantize_experts(experts)
    q.grouping = backend
    with torch.no_grad():
        for p in PARAMS:
            getattr(experts, p).copy_(q.dequantized(p))
    _, ad = with_lora(experts)
    q.adapters["default"] = ad
    ran = []
    for e, layer in enumerate(q.gate_up_proj):
        layer.register_forward_hook(lambda *_, e=e: ran.append(e))
    index, weights = routing(tokens=6, top_k=2, experts=3)
    x = torch.randn(6, H)
    torch.testing.assert_close(q(x, index, weights), peft_form(experts, ad, x, index, weights),
                               atol=1e-5, rtol=1e-5)
    assert sorted(ran) == sorted(index.unique().tolist())
