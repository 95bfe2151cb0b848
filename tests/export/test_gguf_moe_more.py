"""GGUF export of GPT-OSS as llama.cpp's gpt-oss (experts from [E, in, out] with gate/up
interleaved by column to stacked [E, out, in] gate / up / down with their [E, out] biases,
attention sinks and biases, the sliding window, YaRN) and of DeepSeek-V3 as its deepseek2
(MLA's kv_b_proj split per head into attn_k_b / attn_v_b, dense lead layers, shared experts,
sigmoid routing in groups with the selection bias); read back by our loader with the model's
logits; the settings llama.cpp's graphs compute differently refused by name."""

import copy
import json

import pytest
import torch

gguf = pytest.importorskip("gguf")

from families import family_tokenizer  # noqa: E402
from loratune.adapters import add_adapter, save_adapter  # noqa: E402
from loratune.config import LoraConfig  # noqa: E402
from loratune.export.gguf_arch import GGUFExportError  # noqa: E402
from loratune.export.gguf_file import write_gguf, write_lora_gguf  # noqa: E402
from loratune.export.merge import merge_folder, read_adapters  # noqa: E402
from loratune.models import load_model  # noqa: E402
from tests.adapters.test_expert_lora import randomize  # noqa: E402
from tests.export.test_gguf_moe import _apply_as_llamacpp, build, logits, read, values  # noqa: E402

# llama.cpp rounds YaRN's correction range (truncate) and uses betas 32 / 1 for gpt-oss
YARN = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
        "truncate": True, "original_max_position_embeddings": 2000, "rope_theta": 10000.0}
# 200 positions: past the sliding window (128) of the even layers
LONG = torch.arange(3, 203).unsqueeze(0)
BLOCK = {"attn_norm.weight", "post_attention_norm.weight", "attn_sinks.weight"} | {
    f"{t}.{k}" for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate_inp",
                         "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
    for k in ("weight", "bias")}


def gpt_oss(seed: int = 0, **fields):
    model, tok = build("gpt_oss", seed, rope_parameters=dict(YARN), **fields)
    with torch.no_grad():  # biases start at zero: give them values whose layout shows
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.5)
    return model, tok


def saved_and_exported(tmp_path_factory, name: str, build):
    """(model, its f32 GGUF): the tiny model built, saved as a folder, then written."""
    root = tmp_path_factory.mktemp(name)
    model, tok = build()
    model.save_pretrained(root / "m")
    tok.save_pretrained(root / "m")
    return model, write_gguf(root / "m", root / "m.gguf", "f32")


def assert_refused(build, fields: dict, why: str, folder):
    """The tiny model saved with `fields` over its config.json: export refused matching `why`,
    no file left behind."""
    model, tok = build()
    model.save_pretrained(folder / "m")
    tok.save_pretrained(folder / "m")
    config = json.loads((folder / "m" / "config.json").read_text())
    (folder / "m" / "config.json").write_text(json.dumps({**config, **fields}))
    with pytest.raises(GGUFExportError, match=why):
        write_gguf(folder / "m", folder / "m.gguf", "f32")
    assert not (folder / "m.gguf").exists()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return saved_and_exported(tmp_path_factory, "gpt_oss", gpt_oss)


def test_gpt_oss_tensors_and_keys_as_llamacpp_reads_them(exported):
    model, path = exported
    fields, tensors = read(path)
    assert fields["general.architecture"] == "gpt-oss"
    assert set(tensors) == {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{n}" for i in range(2) for n in BLOCK}
    experts = model.model.layers[1].mlp.experts
    gate_up, bias = experts.gate_up_proj.detach(), experts.gate_up_proj_bias.detach()
    # transformers: x @ W[e] with gate in even columns, up in odd; llama.cpp: W[e] @ x
    torch.testing.assert_close(values(tensors["blk.1.ffn_gate_exps.weight"]),
                               gate_up[..., ::2].transpose(1, 2))
    torch.testing.assert_close(values(tensors["blk.1.ffn_up_exps.weight"]),
                               gate_up[..., 1::2].transpose(1, 2))
    torch.testing.assert_close(values(tensors["blk.1.ffn_gate_exps.bias"]), bias[:, ::2])
    torch.testing.assert_close(values(tensors["blk.1.ffn_up_exps.bias"]), bias[:, 1::2])
    torch.testing.assert_close(values(tensors["blk.1.ffn_down_exps.weight"]),
                               experts.down_proj.detach().transpose(1, 2))
    torch.testing.assert_close(values(tensors["blk.1.ffn_down_exps.bias"]),
                               experts.down_proj_bias.detach())
    torch.testing.assert_close(values(tensors["blk.0.attn_sinks.weight"]),
                               model.model.layers[0].self_attn.sinks.detach())
    assert tensors["blk.1.ffn_gate_exps.weight"].shape.tolist() == [32, 16, 4]  # ne: in, out, E
    assert fields["gpt-oss.expert_count"] == 4 and fields["gpt-oss.expert_used_count"] == 2
    assert fields["gpt-oss.expert_feed_forward_length"] == 16
    assert fields["gpt-oss.attention.sliding_window"] == model.config.sliding_window
    assert fields["gpt-oss.rope.scaling.type"] == "yarn"
    assert fields["gpt-oss.rope.scaling.factor"] == 32.0
    assert fields["gpt-oss.rope.scaling.original_context_length"] == 2000


@pytest.mark.parametrize("kind", ["f32", "f16"])
def test_gpt_oss_read_back_by_our_loader_with_the_models_logits(kind, exported, tmp_path):
    model, _ = exported
    folder = tmp_path / "m"
    model.save_pretrained(folder)
    family_tokenizer("qwen3").save_pretrained(folder)
    path = write_gguf(folder, tmp_path / f"m.{kind}.gguf", kind)
    if kind == "f16":  # matrices in half precision; norms, biases and sinks in f32
        model = copy.deepcopy(model)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.dim() > 1 and not n.endswith("bias"):
                    p.copy_(p.half().float())
    loaded, _ = load_model(str(path))
    assert type(loaded).__name__ == "GptOssForCausalLM"
    assert loaded.config.layer_types == model.config.layer_types
    assert loaded.config.rope_parameters["rope_type"] == "yarn"
    with torch.no_grad():
        torch.testing.assert_close(loaded(LONG).logits, model(LONG).logits, atol=1e-4, rtol=0)
    # YaRN as llama.cpp rounds it: the same frequencies and scale, where the unrounded
    # correction range (truncate=false) would give others for this shape
    torch.testing.assert_close(loaded.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq,
                               atol=0, rtol=0)
    assert loaded.model.rotary_emb.attention_scaling == model.model.rotary_emb.attention_scaling


def test_the_yarn_rounding_matters_for_the_test_shape():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    model, _ = gpt_oss()
    rounded, _ = ROPE_INIT_FUNCTIONS["yarn"](model.config, torch.device("cpu"))
    model.config.rope_parameters = {**YARN, "truncate": False}
    exact, _ = ROPE_INIT_FUNCTIONS["yarn"](model.config, torch.device("cpu"))
    assert (rounded - exact).abs().max() > 1e-4


def test_gpt_oss_quantized_keeps_biases_in_f32(exported, tmp_path):
    model, _ = exported
    model.save_pretrained(tmp_path / "m")
    family_tokenizer("qwen3").save_pretrained(tmp_path / "m")
    _, tensors = read(write_gguf(tmp_path / "m", tmp_path / "q.gguf", "q8_0"))
    assert tensors["blk.1.ffn_gate_exps.bias"].tensor_type == gguf.GGMLQuantizationType.F32
    assert tensors["blk.1.ffn_gate_exps.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0


@pytest.mark.parametrize("fields,why", [
    ({"rope_parameters": {**YARN, "truncate": False}},
     "rope_parameters.truncate=false; llama.cpp's YaRN rounds the correction range"),
    ({"rope_parameters": {**YARN, "beta_fast": 16.0}},
     r"beta_fast/beta_slow=\(16.0, 1.0\); llama.cpp's gpt-oss uses its default YaRN betas"),
    ({"swiglu_limit": 5.0}, r"swiglu_limit=\(1.702, 5.0\); llama.cpp's gpt-oss hard-codes"),
    ({"layer_types": ["full_attention", "sliding_attention"]},
     "layer_types=.*llama.cpp's gpt-oss makes even layers sliding-window"),
])
def test_gpt_oss_settings_llamacpp_computes_differently_are_refused(fields, why, tmp_path):
    assert_refused(gpt_oss, fields, why, tmp_path)


def adapted(tmp_path):
    """(adapted model, base folder, adapter folder): LoRA on GPT-OSS's attention and on its
    transposed, biased experts (gate and up interleaved: their B rows alternate)."""
    base, tok = gpt_oss()
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    model, _ = gpt_oss()
    add_adapter(model, LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                      "experts"]))
    randomize(model)
    save_adapter(model, tmp_path / "a")
    assert (logits(model) - logits(base)).abs().max() > 1e-2
    return model, tmp_path / "base", tmp_path / "a"


def test_gpt_oss_merged_adapter_gguf_reads_back_with_the_adapted_logits(tmp_path):
    model, base, adapter = adapted(tmp_path)
    merged = merge_folder(base, read_adapters([adapter], None), tmp_path / "merged").out
    loaded, _ = load_model(str(write_gguf(merged, tmp_path / "m.gguf", "f32")))
    with torch.no_grad():
        torch.testing.assert_close(loaded(LONG).logits, model(LONG).logits, atol=1e-4, rtol=0)


def test_gpt_oss_lora_gguf_applied_as_llamacpp_does_equals_the_merge(tmp_path):
    _, base, adapter = adapted(tmp_path)
    fields, lora = read(write_lora_gguf(adapter, base, tmp_path / "a.gguf"))
    assert fields["general.type"] == "adapter" and fields["general.architecture"] == "gpt-oss"
    assert {n.rsplit(".lora_", 1)[0] for n in lora} == {
        f"blk.{i}.{p}.weight" for i in range(2)
        for p in ("attn_q", "attn_v", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")}
    merged = merge_folder(base, read_adapters([adapter], None), tmp_path / "merged").out
    _, want = read(write_gguf(merged, tmp_path / "m.gguf", "f32"))
    _, plain = read(write_gguf(base, tmp_path / "b.gguf", "f32"))
    got = _apply_as_llamacpp(plain, lora, fields["adapter.lora.alpha"])
    for n in want:
        torch.testing.assert_close(got[n], values(want[n]), atol=1e-5, rtol=0, msg=n)


def deepseek_v3(**fields):
    model, tok = build("deepseek_v3", **fields)
    with torch.no_grad():  # a router whose choice matters, a selection bias that moves it
        for layer in model.model.layers[model.config.first_k_dense_replace:]:
            layer.mlp.gate.weight.normal_(0, 0.5)
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    return model, tok


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    return saved_and_exported(tmp_path_factory, "deepseek_v3", deepseek_v3)


def test_deepseek_v3_mla_and_routing_as_llamacpp_reads_them(deepseek):
    model, path = deepseek
    fields, tensors = read(path)
    cfg, attn = model.config, model.model.layers[1].self_attn
    assert fields["general.architecture"] == "deepseek2"
    assert {n for n in tensors if n.startswith("blk.0.")} == {
        f"blk.0.{n}.weight" for n in ("attn_norm", "attn_q_a", "attn_q_a_norm", "attn_q_b",
                                      "attn_kv_a_mqa", "attn_kv_a_norm", "attn_k_b", "attn_v_b",
                                      "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    assert {n for n in tensors if n.startswith("blk.1.ffn") or "exp" in n} >= {
        "blk.1.ffn_gate_inp.weight", "blk.1.exp_probs_b.bias", "blk.1.ffn_gate_exps.weight",
        "blk.1.ffn_up_exps.weight", "blk.1.ffn_down_exps.weight", "blk.1.ffn_gate_shexp.weight",
        "blk.1.ffn_up_shexp.weight", "blk.1.ffn_down_shexp.weight"}
    # kv_b_proj per head: [nope rows of K | v rows of V] x kv_lora_rank
    per_head = attn.kv_b_proj.weight.detach().reshape(4, 16, 16)
    torch.testing.assert_close(values(tensors["blk.1.attn_k_b.weight"]),
                               per_head[:, :8].transpose(1, 2))  # absorbed into the query
    torch.testing.assert_close(values(tensors["blk.1.attn_v_b.weight"]), per_head[:, 8:])
    torch.testing.assert_close(values(tensors["blk.1.exp_probs_b.bias"]),
                               model.model.layers[1].mlp.gate.e_score_correction_bias)
    want = {"leading_dense_block_count": 1, "attention.q_lora_rank": 16,
            "attention.kv_lora_rank": 16, "attention.head_count_kv": 1,
            "attention.key_length": 24, "attention.value_length": 16,
            "attention.key_length_mla": 16, "attention.value_length_mla": 8,
            "rope.dimension_count": 8, "expert_shared_count": 1, "expert_count": 4,
            "expert_used_count": 2, "expert_feed_forward_length": 16,
            "expert_weights_scale": cfg.routed_scaling_factor, "expert_weights_norm": True,
            "expert_gating_func": int(gguf.ExpertGatingFuncType.SIGMOID),
            "expert_group_count": 2, "expert_group_used_count": 1}
    assert {k: fields[f"deepseek2.{k}"] for k in want} == want


def test_deepseek_v3_read_back_by_our_loader_with_the_models_logits(deepseek):
    model, path = deepseek
    loaded, _ = load_model(str(path))
    assert type(loaded).__name__ == "DeepseekV3ForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(loaded(LONG).logits, model(LONG).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("fields,why", [
    ({"rope_interleave": False}, "rope_interleave=false; llama.cpp's deepseek2 rotates adjacent"),
    ({"attention_bias": True}, "attention_bias=true; llama.cpp's deepseek2 has no attention"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                          "original_max_position_embeddings": 64}},
     "mscale_all_dim=None; llama.cpp's deepseek2 YaRN without it"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}},
     "rope_type=linear; llama.cpp's deepseek2 runs plain RoPE or YaRN"),
])
def test_deepseek_v3_settings_llamacpp_computes_differently_are_refused(fields, why, tmp_path):
    assert_refused(deepseek_v3, fields, why, tmp_path)


def test_deepseek_v3_merged_adapter_gguf_reads_back_and_mla_lora_gguf_is_refused(tmp_path):
    base, tok = deepseek_v3()
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    model, _ = deepseek_v3()
    add_adapter(model, LoraConfig(r=2, lora_alpha=8, target_modules=["kv_b_proj", "q_b_proj"]))
    randomize(model)
    save_adapter(model, tmp_path / "a")
    merged = merge_folder(tmp_path / "base", read_adapters([tmp_path / "a"], None),
                          tmp_path / "merged").out
    loaded, _ = load_model(str(write_gguf(merged, tmp_path / "m.gguf", "f32")))
    with torch.no_grad():
        assert (model(LONG).logits - base(LONG).logits).abs().max() > 1e-2
        torch.testing.assert_close(loaded(LONG).logits, model(LONG).logits, atol=1e-4, rtol=0)
    # llama.cpp's deepseek2 multiplies the MLA projections with no adapter hook
    with pytest.raises(GGUFExportError, match="kv_b_proj, which llama.cpp's deepseek2 "
                                              "multiplies without applying adapters"):
        write_lora_gguf(tmp_path / "a", tmp_path / "base", tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()
