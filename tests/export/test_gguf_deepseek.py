"""GGUF export of DeepSeek-V2 (V2-Lite's shape: q_proj with no low-rank pair, softmax routing
with plain top-k) as llama.cpp's deepseek2, and DeepSeek's YaRN (mscale / mscale_all_dim) for
V2 and V3: the keys llama.cpp reads, read back by our loader with the model's logits (1e-4),
the YaRN scales llama.cpp computes from those keys equal to transformers', and the settings
llama.cpp computes differently refused by name."""

import math

import pytest
import torch

gguf = pytest.importorskip("gguf")

from loratune.export.gguf_file import write_gguf  # noqa: E402
from loratune.models import load_model  # noqa: E402
from loratune.models.gguf_config import GGUFLoadError  # noqa: E402
from tests.export.test_gguf_moe import build, read  # noqa: E402
from tests.export.test_gguf_moe_more import LONG, assert_refused, deepseek_v3  # noqa: E402

# DeepSeek-V2-Lite's routing and attention: no q_a/q_b pair, one group, softmax top-k
LITE = dict(q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1,
            norm_topk_prob=False, routed_scaling_factor=1.0)
# V2-Lite's YaRN (factor 40 over 4096 there); a short original context so LONG reaches past it
V2_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
           "mscale": 0.707, "mscale_all_dim": 0.707, "beta_fast": 32.0, "beta_slow": 1.0,
           "rope_theta": 10000.0}
V3_YARN = {**V2_YARN, "mscale": 1.0, "mscale_all_dim": 1.0}


def deepseek_v2(**fields):
    model, tok = build("deepseek_v2", **{**LITE, **fields})
    with torch.no_grad():  # a router whose choice matters
        for layer in model.model.layers[model.config.first_k_dense_replace:]:
            layer.mlp.gate.weight.normal_(0, 0.5)
    return model, tok


def exported(tmp_path, build_model, **fields):
    model, tok = build_model(**fields)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    return model, write_gguf(tmp_path / "m", tmp_path / "m.gguf", "f32")


def assert_read_back(model, path):
    loaded, _ = load_model(str(path))
    assert type(loaded).__name__ == type(model).__name__
    with torch.no_grad():
        torch.testing.assert_close(loaded(LONG).logits, model(LONG).logits, atol=1e-4, rtol=0)
    return loaded


def test_v2_lite_keys_and_tensors_as_llamacpp_reads_them(tmp_path):
    model, path = exported(tmp_path, deepseek_v2)
    fields, tensors = read(path)
    assert fields["general.architecture"] == "deepseek2"
    want = {"attention.q_lora_rank": 0, "expert_gating_func": 1,  # llama.cpp's SOFTMAX
            "expert_weights_norm": False, "expert_weights_scale": 1.0, "expert_count": 4,
            "expert_used_count": 2, "leading_dense_block_count": 1, "expert_shared_count": 1}
    assert {k: fields[f"deepseek2.{k}"] for k in want} == want
    assert "deepseek2.expert_group_count" not in fields
    assert "blk.1.attn_q.weight" in tensors and not any("attn_q_a" in n for n in tensors)
    q = model.model.layers[1].self_attn.q_proj.weight
    assert list(reversed(tensors["blk.1.attn_q.weight"].shape.tolist())) == list(q.shape)


def test_v2_lite_read_back_by_our_loader_with_the_models_logits(tmp_path):
    model, path = exported(tmp_path, deepseek_v2)
    loaded = assert_read_back(model, path)
    assert loaded.config.q_lora_rank is None and loaded.config.topk_method == "greedy"


def test_v2_group_routing_that_keeps_every_group_is_written(tmp_path):
    """group_limited_greedy with topk_group = n_group drops no group: plain top-k, as
    llama.cpp runs it (the full V2 attention, with q_a/q_b, too)."""
    model, path = exported(tmp_path, deepseek_v2, q_lora_rank=16,
                           topk_method="group_limited_greedy", n_group=2, topk_group=2)
    assert_read_back(model, path)


@pytest.mark.parametrize("fields,why", [
    ({"topk_method": "group_limited_greedy", "n_group": 2, "topk_group": 1},
     "topk_method=group_limited_greedy with n_group=2, topk_group=1; llama.cpp scores an "
     "expert group by the sum of its two best experts"),
    ({"rope_parameters": {**V2_YARN, "mscale": 1.0}},
     "mscale=1.0, mscale_all_dim=0.707; llama.cpp's deepseek2 takes mscale equal to "
     "mscale_all_dim"),
    ({"rope_parameters": {k: v for k, v in V2_YARN.items() if k != "mscale_all_dim"}},
     r"mscale_all_dim=None; llama.cpp's deepseek2 YaRN without it scales q·k by"),
    ({"rope_parameters": {**V2_YARN, "attention_factor": 1.5}}, "attention_factor=1.5"),
    ({"rope_parameters": {**V2_YARN, "beta_fast": 16.0}}, "default YaRN betas 32 / 1"),
    ({"rope_parameters": {**V2_YARN, "truncate": False}}, "truncate=false"),
])
def test_v2_settings_llamacpp_computes_differently_are_refused(fields, why, tmp_path):
    assert_refused(deepseek_v2, fields, why, tmp_path)


def llamacpp_yarn_scales(fields: dict, qk_head_dim: int) -> tuple[float, float]:
    """(rotary scale, q·k scale) llama.cpp's deepseek2 computes from the file's keys:
    llama_context's yarn_attn_factor (mscale taken = mscale_all_dim, then divided by
    1 + 0.1·ln(factor)), ggml's rope multiplying it back, and the graph's kq_scale."""
    factor = fields["deepseek2.rope.scaling.factor"]
    log_mul = fields["deepseek2.rope.scaling.yarn_log_multiplier"] / 0.1  # TAG_..._LOG_MUL_FIX

    def m(x):
        return 0.1 * x * math.log(factor) + 1.0
    mscale = log_mul if log_mul != 1.0 else 1.0  # "special-case DEEPSEEK v2"
    attn_factor = m(mscale) / m(log_mul) / m(1.0)
    attn_factor_org = attn_factor * m(1.0)       # also what ggml_rope_ext scales cos/sin by
    kq_scale = (attn_factor_org * m(log_mul)) ** 2 / math.sqrt(qk_head_dim)
    return attn_factor_org, kq_scale


@pytest.mark.parametrize("name,rope", [("deepseek_v2", V2_YARN), ("deepseek_v3", V3_YARN)])
def test_yarn_keys_give_llamacpp_the_scales_transformers_uses(name, rope, tmp_path):
    model, path = exported(tmp_path, deepseek_v2 if name == "deepseek_v2" else deepseek_v3,
                           rope_parameters=dict(rope))
    fields, _ = read(path)
    assert fields["deepseek2.rope.scaling.yarn_log_multiplier"] == pytest.approx(
        0.1 * rope["mscale_all_dim"])
    attn = model.model.layers[0].self_attn
    rotary, kq = llamacpp_yarn_scales(fields, attn.qk_head_dim)
    assert rotary == pytest.approx(model.model.rotary_emb.attention_scaling, rel=1e-6)
    assert kq == pytest.approx(attn.scaling, rel=1e-6)
    assert kq > 1.1 / math.sqrt(attn.qk_head_dim)  # the YaRN scale is there to be got wrong


@pytest.mark.parametrize("name,rope", [("deepseek_v2", V2_YARN), ("deepseek_v3", V3_YARN)])
def test_yarn_model_read_back_by_our_loader_with_the_models_logits(name, rope, tmp_path):
    build_model = deepseek_v2 if name == "deepseek_v2" else deepseek_v3
    # weights large enough that attention, and so the YaRN scales, move the logits
    model, path = exported(tmp_path, build_model, rope_parameters=dict(rope),
                           initializer_range=0.1)
    plain, _ = build_model(initializer_range=0.1)
    with torch.no_grad():
        assert (plain(LONG).logits - model(LONG).logits).abs().max() > 1e-2
    loaded = assert_read_back(model, path)
    assert loaded.config.rope_parameters["mscale_all_dim"] == pytest.approx(
        rope["mscale_all_dim"])


@pytest.mark.parametrize("change,why", [
    ({"deepseek2.rope.scaling.yarn_log_multiplier": None},
     "yarn_log_multiplier: YaRN without it scales q·k by"),
    ({"deepseek2.expert_group_count": 2, "deepseek2.expert_group_used_count": 1},
     "expert_group_count=2: softmax routing .DeepSeek-V2. is read as plain top-k"),
    ({"deepseek2.expert_gating_func": 3}, "expert_gating_func=3: only softmax"),
])
def test_reader_refuses_deepseek2_keys_transformers_cannot_say(change, why, tmp_path):
    from loratune.models.gguf_moe import moe_config

    _, path = exported(tmp_path, deepseek_v2, rope_parameters=dict(V2_YARN))
    fields, tensors = read(path)
    meta = {k: v for k, v in {**fields, **change}.items() if v is not None}
    with pytest.raises(GGUFLoadError, match=why):
        moe_config(path, meta, set(tensors))
