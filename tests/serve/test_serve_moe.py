"""Serving mixture-of-experts bases (issue 30): tiny Qwen3-MoE, Mixtral, OLMoE, GPT-OSS (its
`router`, biased transposed experts, sliding layers on the dynamic cache) and DeepSeek-V2/V3
(MLA attention, shared experts, group routing) with LoRA on attention, LoRA on the fused routed
experts, on the shared experts, several together, and base rows in one batch — each row equal
to that adapter's own model (ExpertHost with it active): logits to 1e-5, greedy tokens exactly,
in fp32."""

import pytest
import torch

from loratune.adapters import (AdapterHost, add_adapter, delete_adapter, disable_adapters,
                               load_adapter, save_adapter, set_active)
from loratune.config import LoraConfig
from loratune.serve.engine import Engine
from loratune.serve.pool import AdapterPool, read_lora
from loratune.serve.types import GenerationRequest, SamplingParams
from tests.models.test_moe_families import build_moe

CONFIGS = {
    "attention": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "experts": LoraConfig(r=4, lora_alpha=8, target_modules=["experts"]),
    "both": LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj", "experts"]),
}
# DeepSeek: LoRA on MLA's low-rank projections, and on the shared experts (plain linears)
DEEPSEEK = {
    "attention": LoraConfig(r=4, lora_alpha=8, target_modules=["q_b_proj", "kv_b_proj"]),
    "experts": CONFIGS["experts"],
    "shared": LoraConfig(r=4, lora_alpha=8, target_modules=["shared_experts"]),
    "both": LoraConfig(r=2, lora_alpha=4, target_modules=["kv_a_proj_with_mqa", "o_proj",
                                                          "experts", "shared_experts"]),
}
FAMILIES = {"qwen3_moe": CONFIGS, "mixtral": CONFIGS, "olmoe": CONFIGS, "gpt_oss": CONFIGS,
            "deepseek_v3": DEEPSEEK, "deepseek_v2": DEEPSEEK}
PROMPTS = [[3, 40, 200, 17, 301], [7, 8], [100, 101, 102, 103, 104, 105, 106], [42]]
NEW_TOKENS = 10


def greedy(model, prompt):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module", params=list(FAMILIES))
def served(request, tmp_path_factory):
    """The tiny MoE model, one saved adapter per config and references from the training
    model with that adapter alone active."""
    model, tok = build_moe(request.param)
    configs = FAMILIES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    g = torch.Generator().manual_seed(3)
    for name, config in configs.items():
        add_adapter(model, config, name)
        with torch.no_grad():
            for mod in model.modules():
                if isinstance(mod, AdapterHost) and name in mod.adapters:
                    for p in mod.adapters[name].parameters():
                        p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        save_adapter(model, folder / name, name)
    ids = torch.randint(0, 400, (len(configs) + 1, 6), generator=g)
    refs, logits = {}, {}
    for name in [None, *configs]:
        with torch.no_grad(), (disable_adapters(model) if name is None else _active(model, name)):
            refs.update({(name, j): greedy(model, p) for j, p in enumerate(PROMPTS)})
            logits[name] = model(ids).logits
    for name in configs:
        delete_adapter(model, name)
    return model, folder, refs, logits, ids, tok, configs


class _active:
    def __init__(self, model, name):
        self.model, self.name = model, name

    def __enter__(self):
        set_active(self.model, [self.name])

    def __exit__(self, *exc):
        return False


def test_expert_adapters_are_read_as_blocks_on_the_moe_layers(served):
    model, folder, *_ = served
    moe_layers = {p.removesuffix(".experts") for p, _ in model.named_modules()
                  if p.endswith("mlp.experts")}  # DeepSeek's first layer is dense
    experts = read_lora("experts", folder / "experts", model)
    assert not experts.layers and set(experts.blocks) == moe_layers
    assert {b.reads for b in experts.blocks.values()} == {"input"}
    assert experts.why_no_composition
    both = read_lora("both", folder / "both", model)
    deepseek = "deepseek" in model.config.model_type  # 2 attention targets and shared experts
    linears = 2 * (1 + deepseek) + 3 * len(moe_layers) * deepseek
    assert len(both.layers) == linears and set(both.blocks) == moe_layers
    assert read_lora("attention", folder / "attention", model).why_no_composition is None


@pytest.mark.parametrize("static", [False, True], ids=["eager", "as-recorded"])
def test_one_mixed_forward_equals_each_adapters_own_model(served, static):
    model, folder, _, logits, ids, _, configs = served
    pool = AdapterPool(folder, max_adapters=len(configs))
    slots = pool.bind(model)
    try:
        rows = [0, *(pool.acquire({n: 1.0}) for n in configs)]
        slots.static = static
        with torch.no_grad():
            slots.set(rows, ids.device)
            mixed = model(ids).logits
        for i, name in enumerate([None, *configs]):
            torch.testing.assert_close(mixed[i], logits[name][i], atol=1e-5, rtol=1e-5)
            if name is not None:
                assert (logits[name][i] - logits[None][i]).abs().max() > 1e-3, name
    finally:
        slots.rows, slots.static = None, False


def test_mixed_requests_equal_generate_token_for_token(served):
    model, folder, refs, *_, tok, configs = served
    names = [None, *configs]
    for name in configs:
        assert any(refs[(name, j)] != refs[(None, j)] for j in range(len(PROMPTS))), name
    engine = Engine(model, tok, AdapterPool(folder, max_adapters=len(configs)),
                    base_name="tiny-moe", max_completion_tokens=64)
    engine.eos = set()
    try:
        engine.start()
        handles = [((n, j), engine.submit(GenerationRequest(
            PROMPTS[j], {n: 1.0} if n else {}, SamplingParams(max_tokens=NEW_TOKENS))))
            for n in names for j in range(len(PROMPTS))]
        for key, handle in handles:
            assert handle.result().token_ids == refs[key], key
    finally:
        engine.stop()


def test_expert_lora_served_on_a_4bit_base_equals_qlora_with_it(tmp_path):
    """On the experts held in 4 bits (QuantizedExperts), the served expert LoRA row equals the
    4-bit model with the adapter loaded (1e-5); the base row is the base's, bit for bit."""
    from loratune.config import ModelConfig, QuantConfig
    from loratune.models import load_model

    model, tok = build_moe("qwen3_moe")
    model.save_pretrained(tmp_path / "base")
    add_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "experts"]), "ex")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, AdapterHost) and "ex" in mod.adapters:
                for p in mod.adapters["ex"].parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    save_adapter(model, tmp_path / "adapters" / "ex", "ex")
    nf4 = ModelConfig(name=str(tmp_path / "base"), quantization=QuantConfig(type="nf4"))
    ids = torch.tensor([[3, 40, 200, 17, 301, 99], [5, 6, 7, 8, 9, 10]])
    served, _ = load_model(nf4)
    with torch.no_grad():
        base = served(ids).logits
    pool = AdapterPool(tmp_path / "adapters", max_adapters=1)
    slots = pool.bind(served)
    with torch.no_grad():
        slots.set([pool.acquire({"ex": 1.0}), 0], ids.device)
        mixed = served(ids).logits
    live, _ = load_model(nf4)
    load_adapter(live, tmp_path / "adapters" / "ex")
    with torch.no_grad():
        want = live(ids).logits
    assert (want[0] - base[0]).abs().max() > 1e-2
    torch.testing.assert_close(mixed[0], want[0], atol=1e-5, rtol=0)
    assert torch.equal(mixed[1], base[1])
