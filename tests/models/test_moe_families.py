"""Mixture-of-experts families, tiny from their config classes: load, LoRA on attention trains,
save/reload, merge, QLoRA with the routed experts in NF4 (one 4-bit matrix per expert), and
the planner's total/active counts."""

import json
import math

import pytest
import torch

from families import family_conversation, family_tokenizer
from loratune.adapters import load_adapter
from loratune.config import ModelConfig, QuantConfig, build_config
from loratune.export.merge import merge_folder, read_adapters
from loratune.models import load_model
from loratune.models.moe_experts import QuantizedExperts, is_fused_experts, quantize_experts
from loratune.quant.nf4 import dequantize_4bit, quantize_4bit
from loratune.train import train

SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, tie_word_embeddings=False)
ROUTED = dict(num_experts_per_tok=2)
MLA = dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
           v_head_dim=8, first_k_dense_replace=1, n_shared_experts=1, n_group=2, topk_group=1)
# model_type -> (config fields, LoRA targets on attention)
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLA_ATTENTION = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
MOE = {
    "qwen3_moe": (dict(intermediate_size=64, moe_intermediate_size=16, num_experts=4,
                       head_dim=8, norm_topk_prob=True), ATTENTION),
    "mixtral": (dict(intermediate_size=16, num_local_experts=4), ATTENTION),
    "olmoe": (dict(intermediate_size=16, num_experts=4), ATTENTION),
    "gpt_oss": (dict(intermediate_size=16, num_local_experts=4, head_dim=8,
                     layer_types=["sliding_attention", "full_attention"]), ATTENTION),
    "deepseek_v3": (dict(intermediate_size=64, moe_intermediate_size=16, n_routed_experts=4,
                         **MLA), MLA_ATTENTION),
    "deepseek_v2": (dict(intermediate_size=64, moe_intermediate_size=16, n_routed_experts=4,
                         topk_method="group_limited_greedy", **MLA), MLA_ATTENTION),
}
IDS = torch.tensor([[3, 40, 200, 17, 301, 99, 5, 64, 128, 7]])


def moe_config(name: str, tok):
    from transformers import AutoConfig

    ids = {"eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"),
           "pad_token_id": tok.convert_tokens_to_ids("<|endoftext|>"), "bos_token_id": None}
    fields = {**SHAPE, **ROUTED, **ids, **MOE[name][0]}  # MLA: every head its own keys
    cfg = AutoConfig.for_model(name, vocab_size=len(tok), **fields)
    cfg._attn_implementation = "eager"
    return cfg


def build_moe(name: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    tok = family_tokenizer("qwen3")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(moe_config(name, tok), dtype=torch.float32)
    with torch.no_grad():  # routers start at zero in some classes: give them a real choice
        for n, p in model.named_parameters():
            if p.abs().max() == 0 and "bias" not in n:
                p.normal_(0, 0.5)
    return model.eval(), tok


@pytest.fixture(scope="module")
def moe_folder(tmp_path_factory):
    folders = {}

    def get(name):
        if name not in folders:
            model, tok = build_moe(name)
            folders[name] = tmp_path_factory.mktemp(name) / "model"
            model.save_pretrained(folders[name])
            tok.save_pretrained(folders[name])
        return folders[name]
    return get


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def train_moe(folder, tmp_path, targets, quant=False, steps=2, rows=4, alpha=8):
    """`train` on the model folder: LoRA r 4 on `targets`, chat rows, NF4 base if `quant`."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": family_conversation(True)}) + "\n"
                            for _ in range(rows)))
    model = {"name": str(folder), **({"quantization": {"type": "nf4"}} if quant else {})}
    cfg = build_config({
        "output_dir": str(tmp_path / "run"), "model": model,
        "adapter": {"method": "lora", "r": 4, "lora_alpha": alpha, "target_modules": targets},
        "data": {"train": str(data), "max_length": 128},
        "train": {"max_steps": steps, "batch_size": 2, "lr": 5e-2, "warmup_ratio": 0.0}})
    return train(cfg, quiet=True)


def experts_of(model):
    return [m for m in model.modules() if is_fused_experts(m)]


@pytest.mark.parametrize("name", MOE)
def test_moe_loads_trains_reloads_and_merges(name, moe_folder, tmp_path):
    """The folder loads with the model's own logits and its experts fused; LoRA on attention
    trains; the adapter reloads into a fresh base with equal logits, and the merged folder,
    loaded by transformers, gives them too."""
    from transformers import AutoModelForCausalLM

    folder = moe_folder(name)
    base, _ = load_model(str(folder))
    torch.testing.assert_close(logits(base), logits(build_moe(name)[0]), atol=1e-5, rtol=0)
    assert experts_of(base) and all(e.gate_up_proj.dim() == 3 for e in experts_of(base))
    result = train_moe(folder, tmp_path, MOE[name][1])
    assert all(math.isfinite(h["loss"]) for h in result.history)
    before = logits(base)
    load_adapter(base, result.adapter_dir)
    adapted = logits(base)
    assert (adapted - before).abs().max() > 1e-4
    merged = merge_folder(folder, read_adapters([result.adapter_dir], None), tmp_path / "merged")
    assert merged.merged_modules > 0
    again = AutoModelForCausalLM.from_pretrained(merged.out, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(again), adapted, atol=1e-4, rtol=0)


def nf4_round_trip_experts(model, blocksize=64):
    """The fp32 model with every quantized weight replaced by its NF4 round trip: linears as
    Linear4bit does, routed experts one [out, in] matrix per expert (GPT-OSS stores [in, out])."""
    skip = model.get_output_embeddings()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear) and mod is not skip:
                mod.weight.copy_(dequantize_4bit(quantize_4bit(mod.weight, blocksize)))
        for mod in experts_of(model):
            t = getattr(mod, "is_transposed", False)
            for p in (mod.gate_up_proj, mod.down_proj):
                for w in p:
                    w.copy_(dequantize_4bit(quantize_4bit(w.t() if t else w, blocksize)).t()
                            if t else dequantize_4bit(quantize_4bit(w, blocksize)))
    return model


@pytest.mark.parametrize("name", MOE)
def test_moe_qlora_experts_in_nf4_match_and_train(name, moe_folder, tmp_path):
    """The 4-bit loader quantizes the routed experts per expert (router and norms stay in the
    compute dtype); logits equal those of the fp32 model whose weights took the same NF4
    round trip within 1e-4; LoRA on attention trains on it."""
    folder = moe_folder(name)
    q, _ = load_model(ModelConfig(name=str(folder), quantization=QuantConfig(type="nf4")))
    held = [m for m in q.modules() if isinstance(m, QuantizedExperts)]
    assert len(held) == len(experts_of(build_moe(name)[0])) and not experts_of(q)
    routers = [p for n, p in q.named_parameters() if ".gate." in n or ".router." in n]
    assert routers and all(p.dtype == torch.float32 for p in routers)
    full = nf4_round_trip_experts(load_model(str(folder))[0])
    torch.testing.assert_close(logits(q), logits(full), atol=1e-4, rtol=0)
    result = train_moe(folder, tmp_path, MOE[name][1], quant=True)
    assert all(math.isfinite(h["loss"]) for h in result.history)
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()


def test_quantize_model_replaces_loaded_experts_with_equal_logits():
    """quantize_model on an already-loaded model (the GGUF path) quantizes the experts too."""
    from loratune.models.quantize import quantize_model

    model, _ = build_moe("qwen3_moe")
    want = logits(nf4_round_trip_experts(build_moe("qwen3_moe")[0]))
    names = quantize_model(model, QuantConfig(type="nf4"))
    assert sum(n.endswith(".experts") for n in names) == 2
    torch.testing.assert_close(logits(model), want, atol=1e-4, rtol=0)


def test_quantized_experts_take_a_quarter_of_bf16_memory():
    """NF4 with double-quantized scales: 4.13 bits per weight against bf16's 16."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    experts = Qwen3MoeExperts(Qwen3MoeConfig(hidden_size=256, moe_intermediate_size=128,
                                             num_experts=8))
    torch.nn.init.normal_(experts.gate_up_proj)
    torch.nn.init.normal_(experts.down_proj)
    bf16 = 2 * (experts.gate_up_proj.numel() + experts.down_proj.numel())
    ratio = quantize_experts(experts).quantized_bytes() / bf16
    assert 0.25 < ratio < 0.26, ratio


class ExpertLora(torch.nn.Module):
    """A per-expert LoRA term, as an adapter plugs into QuantizedExperts.adapters."""

    def __init__(self, experts, r=2):
        super().__init__()
        shapes = {p: getattr(experts, p)[0].quantized().shape for p in ("gate_up_proj",
                                                                        "down_proj")}
        self.a = torch.nn.ParameterDict({p: torch.nn.Parameter(torch.randn(4, r, s[1]))
                                         for p, s in shapes.items()})
        self.b = torch.nn.ParameterDict({p: torch.nn.Parameter(torch.randn(4, s[0], r))
                                         for p, s in shapes.items()})

    def delta(self, projection, expert, x):
        return x @ self.a[projection][expert].T @ self.b[projection][expert].T


def test_per_expert_adapters_add_their_term_inside_the_expert():
    """An adapter in QuantizedExperts.adapters adds x A_e^T B_e^T to expert e's gate_up and
    down projections: the output equals transformers' experts forward on W_e + B_e A_e."""
    model, _ = build_moe("qwen3_moe")
    experts = model.model.layers[0].mlp.experts
    q = quantize_experts(experts)
    torch.manual_seed(1)
    lora = ExpertLora(q)
    q.adapters["default"] = lora
    with torch.no_grad():
        for p in ("gate_up_proj", "down_proj"):
            getattr(experts, p).copy_(q.dequantized(p) + lora.b[p] @ lora.a[p])
    x = torch.randn(6, 32)
    index = torch.tensor([[0, 1], [1, 2], [3, 0], [2, 3], [0, 2], [1, 3]])
    weights = torch.rand(6, 2)
    torch.testing.assert_close(q(x, index, weights), experts(x, index, weights), atol=1e-4,
                               rtol=1e-4)
