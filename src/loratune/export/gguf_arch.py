"""What llama.cpp needs to know about each model family, beyond its tensors.

Tensor names come from the `gguf` package's own maps (`gguf.get_tensor_name_map`, built from
its MODEL_TENSORS / TensorNameMap for the architecture); this module holds the rest:
- the llama.cpp architecture an HF architecture becomes (Mistral runs as `llama`);
- how weights change on the way: Q/K rows permuted where llama.cpp rotates interleaved pairs
  (the `llama` architecture), Gemma's RMSNorm weights stored as 1 + w (llama.cpp multiplies by
  the stored value, transformers by 1 + w);
- the metadata keys: sizes, head_dim (key/value length), RoPE base and scaling (llama3 as a
  `rope_freqs` tensor, yarn, linear, Phi-3's longrope factors), Gemma's soft-capping and
  sliding-window layers, Phi-3's partial rotary and original context;
- for mixture-of-experts families (Qwen3-MoE, Mixtral as `llama`, OLMoE, GPT-OSS, DeepSeek-V2
  and V3 as `deepseek2`, with DeepSeek's YaRN): the expert count,
  top-k and per-expert width, and the routing choices llama.cpp's graph hard-codes per
  architecture (top-k weights renormalized or not, every layer sparse), checked against
  config.json. The experts themselves are stacked [experts, out, in] by gguf_file. GPT-OSS's
  graph hard-codes more (the clamped SwiGLU's constants, alternating sliding layers, YaRN's
  rounded correction range and default betas): each checked against config.json.
Gemma's embedding scale (× √hidden) and Qwen2's q/k/v biases need no key: llama.cpp's gemma
graphs scale by √n_embd themselves, and biases are tensors with their own names.
Anything llama.cpp would compute differently (an unknown RoPE type, a Gemma query scale other
than the one llama.cpp hard-codes) is refused by name rather than written wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


class GGUFExportError(ValueError):
    pass


@dataclass(frozen=True)
class Family:
    """One HF architecture as llama.cpp runs it."""

    arch: str                        # gguf.MODEL_ARCH member name
    interleaved_rope: bool = False   # llama.cpp rotates adjacent pairs: permute Q/K rows
    norm_offset: float = 0.0         # added to every `*norm.weight` (Gemma's 1 + w)
    keys: Callable | None = None     # family-specific metadata: keys(writer, config, hf)
    # mixture of experts: whether llama.cpp renormalizes the top-k routing weights for this
    # architecture (a constant in its graph, not a key); None for a dense family
    norm_topk: bool | None = None
    # GPT-OSS's experts: [E, in, out] (x @ W) with gate and up interleaved by column and a bias
    # per projection; llama.cpp stores them [E, out, in] with gate and up apart
    interleaved_experts: bool = False
    # multi-head latent attention (llama.cpp's deepseek2): its keys write the head sizes
    mla: bool = False
    # projections llama.cpp's graph multiplies without its LoRA hook (ggml_mul_mat, not
    # build_lora_mm): an adapter pair on them would be loaded and silently not applied
    no_lora: tuple[str, ...] = ()


def rope_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of each head from [first halves | second halves] to interleaved pairs."""
    rows = w.shape[0]
    return (w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2)
            .reshape(w.shape))


def _head_dim(hf) -> int:
    return getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads


def _rope(hf, layer_type: str | None = None) -> dict:
    """The (standardized) RoPE parameters, per layer type where the model has several."""
    params = dict(getattr(hf, "rope_parameters", None) or {})
    if layer_type is not None and layer_type in params:
        return dict(params[layer_type])
    if "full_attention" in params:
        return dict(params["full_attention"])
    return params


def _layer_window_pattern(writer, hf) -> None:
    """Which layers use sliding-window attention, from `layer_types` (llama.cpp reads a
    per-layer array in place of its built-in pattern)."""
    types = getattr(hf, "layer_types", None)
    if types:
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in types])


def _gemma_query_scale(writer, hf, n_layer_27b: int) -> None:
    # llama.cpp hard-codes the query scale: 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the
    # 27B models (recognised by layer count); transformers uses query_pre_attn_scalar.
    expected = (hf.hidden_size // hf.num_attention_heads if hf.num_hidden_layers == n_layer_27b
                else _head_dim(hf))
    if hf.query_pre_attn_scalar != expected:
        raise GGUFExportError(f"config.json: query_pre_attn_scalar={hf.query_pre_attn_scalar}; "
                              f"llama.cpp scales queries by 1/sqrt({expected}) for this shape, "
                              "so the exported model would compute differently")


def _gemma2_keys(writer, config: dict, hf) -> None:
    _gemma_query_scale(writer, hf, n_layer_27b=46)
    if not hf.tie_word_embeddings:
        raise GGUFExportError("config.json: an untied Gemma 2 output layer; llama.cpp's gemma2 "
                              "reads the output from token_embd")
    if hf.attn_logit_softcapping:
        writer.add_attn_logit_softcapping(float(hf.attn_logit_softcapping))
    if hf.final_logit_softcapping:
        writer.add_final_logit_softcapping(float(hf.final_logit_softcapping))
    writer.add_sliding_window(int(hf.sliding_window))
    _layer_window_pattern(writer, hf)


def _gemma3_keys(writer, config: dict, hf) -> None:
    _gemma_query_scale(writer, hf, n_layer_27b=62)
    if getattr(hf, "attn_logit_softcapping", None):
        raise GGUFExportError("config.json: attn_logit_softcapping is set; llama.cpp's gemma3 "
                              "has no attention soft-capping")
    if getattr(hf, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(hf.final_logit_softcapping))
    if getattr(hf, "sliding_window", None):
        writer.add_sliding_window(int(hf.sliding_window))
        _layer_window_pattern(writer, hf)
        local = _rope(hf, "sliding_attention").get("rope_theta")
        if local is not None:
            writer.add_rope_freq_base_swa(float(local))


def _qwen2vl_keys(writer, config: dict, hf) -> None:
    # M-RoPE: how many rotary pairs follow the temporal, height and width positions (llama.cpp
    # reads four sections); a text token has the same position in all three.
    sections = list(_rope(hf).get("mrope_section") or [])
    if not sections or len(sections) > 4:
        raise GGUFExportError(f"config.json: rope mrope_section={sections}; llama.cpp's qwen2vl "
                              "reads 1 to 4 sections")
    writer.add_rope_dimension_sections(sections + [0] * (4 - len(sections)))


def _phi3_keys(writer, config: dict, hf) -> None:
    rope = _rope(hf)
    writer.add_rope_scaling_orig_ctx_len(int(rope.get(
        "original_max_position_embeddings",
        getattr(hf, "original_max_position_embeddings", None) or hf.max_position_embeddings)))
    # 0 tells llama.cpp's phi3 there is no sliding window (Phi-4-mini)
    writer.add_sliding_window(int(getattr(hf, "sliding_window", None) or 0))


def _refuse_if(cond: bool, field: str, why: str) -> None:
    if cond:
        raise GGUFExportError(f"config.json: {field}; {why}, so the exported model would "
                              "compute differently")


def _qwen3moe_keys(writer, config: dict, hf) -> None:
    _refuse_if(bool(hf.mlp_only_layers) or hf.decoder_sparse_step != 1,
               f"mlp_only_layers={hf.mlp_only_layers}, decoder_sparse_step="
               f"{hf.decoder_sparse_step}", "llama.cpp's qwen3moe makes every layer sparse")
    _refuse_if(bool(getattr(hf, "use_sliding_window", False)), "use_sliding_window=true",
               "llama.cpp's qwen3moe has no sliding window")


def _mixtral_keys(writer, config: dict, hf) -> None:
    _refuse_if(getattr(hf, "sliding_window", None) is not None,
               f"sliding_window={hf.sliding_window}", "llama.cpp's llama has no sliding window")


def _olmoe_keys(writer, config: dict, hf) -> None:
    kv = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
    _refuse_if(kv != hf.num_attention_heads, f"num_key_value_heads={kv}",
               "llama.cpp's olmoe sizes attn_k_norm as n_embd (no grouped-query attention)")
    _refuse_if(getattr(hf, "clip_qkv", None) is not None, f"clip_qkv={hf.clip_qkv}",
               "llama.cpp's olmoe does not clamp q/k/v")
    _refuse_if(bool(hf.tie_word_embeddings), "tie_word_embeddings=true",
               "llama.cpp's olmoe requires its own output tensor")


def _gpt_oss_keys(writer, config: dict, hf) -> None:
    rope = _rope(hf)
    if rope.get("rope_type") == "yarn":
        # llama.cpp's YaRN rounds the ramp's ends to whole dimensions (floor / ceil) and uses
        # its default betas 32 / 1 for gpt-oss (it reads no beta keys for this architecture)
        _refuse_if(not rope.get("truncate", True), "rope_parameters.truncate=false",
                   "llama.cpp's YaRN rounds the correction range to whole dimensions "
                   "(floor/ceil), transformers does not with truncate=false (pass --round-yarn "
                   "to write it as llama.cpp will run it)")
        betas = (rope.get("beta_fast", 32.0), rope.get("beta_slow", 1.0))
        _refuse_if(betas != (32.0, 1.0), f"rope_parameters beta_fast/beta_slow={betas}",
                   "llama.cpp's gpt-oss uses its default YaRN betas 32 / 1")
        _refuse_if(any(rope.get(k) is not None for k in ("attention_factor", "mscale",
                                                        "mscale_all_dim")),
                   "rope_parameters attention_factor/mscale",
                   "llama.cpp's gpt-oss scales by 0.1·ln(factor) + 1 only")
    limits = (float(hf.swiglu_alpha), float(hf.swiglu_limit))
    _refuse_if(limits != (1.702, 7.0), f"swiglu_alpha/swiglu_limit={limits}",
               "llama.cpp's gpt-oss hard-codes the clamped SwiGLU's alpha 1.702 and limit 7.0")
    alternating = ["sliding_attention" if i % 2 == 0 else "full_attention"
                   for i in range(hf.num_hidden_layers)]
    _refuse_if(list(hf.layer_types) != alternating, f"layer_types={list(hf.layer_types)}",
               "llama.cpp's gpt-oss makes even layers sliding-window and odd layers full")
    _refuse_if(not hf.attention_bias, "attention_bias=false",
               "llama.cpp's gpt-oss requires q/k/v/o biases")
    writer.add_sliding_window(int(hf.sliding_window))


def _deepseek_keys(writer, config: dict, hf) -> None:
    """llama.cpp's deepseek2 as DeepSeek-V2 or V3: MLA as MQA over the latent (one kv head of
    kv_lora_rank + rope dims), shared experts, routed weights scaled by routed_scaling_factor;
    V3 routes by sigmoid with the selection bias in groups scored by their two best experts, V2
    by softmax with plain top-k (_deepseek_v2_routing)."""
    import gguf

    _refuse_if(not getattr(hf, "rope_interleave", True), "rope_interleave=false",
               "llama.cpp's deepseek2 rotates adjacent pairs of the rope dimensions")
    _refuse_if(bool(hf.attention_bias), "attention_bias=true",
               "llama.cpp's deepseek2 has no attention biases")
    _deepseek_yarn(writer, hf)
    writer.add_leading_dense_block_count(int(hf.first_k_dense_replace))
    # 0: q_proj without the low-rank pair (V2-Lite); llama.cpp reads the key, or skips it for
    # 26/27 layers, and loads attn_q when it is 0 (older versions: for 26/27 layers only)
    writer.add_q_lora_rank(int(hf.q_lora_rank or 0))
    writer.add_kv_lora_rank(int(hf.kv_lora_rank))
    writer.add_head_count_kv(1)
    writer.add_key_length(int(hf.kv_lora_rank + hf.qk_rope_head_dim))
    writer.add_value_length(int(hf.kv_lora_rank))
    writer.add_key_length_mla(int(hf.qk_nope_head_dim + hf.qk_rope_head_dim))
    writer.add_value_length_mla(int(hf.v_head_dim))
    writer.add_rope_dimension_count(int(hf.qk_rope_head_dim))
    writer.add_expert_shared_count(int(hf.n_shared_experts))
    writer.add_expert_weights_scale(float(hf.routed_scaling_factor))
    if hf.model_type == "deepseek_v2":
        _deepseek_v2_routing(writer, hf)
        return
    writer.add_expert_weights_norm(bool(hf.norm_topk_prob))
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    groups = int(hf.n_group or 1)
    _refuse_if(groups > 1 and not 0 < hf.topk_group < groups,
               f"n_group={groups}, topk_group={hf.topk_group}",
               "llama.cpp's grouped routing needs 0 < topk_group < n_group")
    if groups > 1:
        writer.add_expert_group_count(groups)
        writer.add_expert_group_used_count(int(hf.topk_group))


def _deepseek_v2_routing(writer, hf) -> None:
    """V2's softmax over all experts, top-k, never renormalized (transformers' DeepseekV2 has no
    norm_topk_prob). Its group_limited_greedy keeps the topk_group groups with the best single
    expert, where llama.cpp scores a group by its two best: the same only when every group is
    kept (topk_group >= n_group, e.g. V2-Lite's 1 / 1)."""
    import gguf

    groups, kept = int(hf.n_group or 1), int(hf.topk_group or 1)
    _refuse_if(hf.topk_method == "group_limited_greedy" and kept < groups,
               f"topk_method=group_limited_greedy with n_group={groups}, topk_group={kept}",
               "llama.cpp scores an expert group by the sum of its two best experts where "
               "DeepSeek-V2 takes the group's best one (export needs topk_group >= n_group, "
               "where no group is dropped)")
    _refuse_if(hf.topk_method not in ("greedy", "group_limited_greedy"),
               f"topk_method={hf.topk_method}", "llama.cpp's deepseek2 routes by plain top-k")
    writer.add_expert_weights_norm(False)
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)


def _deepseek_yarn(writer, hf) -> None:
    """DeepSeek's YaRN as llama.cpp's deepseek2 runs it: the rotary part scaled by
    m(mscale)/m(mscale_all_dim) and q·k by m(mscale_all_dim)² (m(x) = 0.1·x·ln(factor) + 1), as
    transformers does, but llama.cpp reads only mscale_all_dim (rope.scaling.yarn_log_multiplier,
    written ×0.1 as convert_hf_to_gguf does) and takes mscale equal to it, and its betas are
    fixed at 32 / 1. Other settings are refused by name."""
    rope = _rope(hf)
    kind = rope.get("rope_type", "default")
    _refuse_if(kind not in ("default", "yarn"), f"rope_parameters rope_type={kind}",
               "llama.cpp's deepseek2 runs plain RoPE or YaRN")
    if kind != "yarn":
        return
    factor, scale = float(rope["factor"]), rope.get("mscale_all_dim")
    _refuse_if(not scale, f"rope_parameters mscale_all_dim={scale}",
               "llama.cpp's deepseek2 YaRN without it scales q·k by (0.1·ln(factor) + 1)², "
               "transformers by 1")
    _refuse_if(rope.get("mscale") != scale,
               f"rope_parameters mscale={rope.get('mscale')}, mscale_all_dim={scale}",
               "llama.cpp's deepseek2 takes mscale equal to mscale_all_dim (its rotary scale is "
               "1), transformers scales the rotary part by m(mscale)/m(mscale_all_dim)")
    _refuse_if(rope.get("attention_factor") is not None,
               f"rope_parameters attention_factor={rope.get('attention_factor')}",
               "llama.cpp's deepseek2 computes its YaRN scale from mscale_all_dim only")
    _refuse_if(factor < 1, f"rope_parameters factor={factor}",
               "llama.cpp's deepseek2 takes ln(factor) with no floor at factor 1")
    betas = (rope.get("beta_fast") or 32.0, rope.get("beta_slow") or 1.0)
    _refuse_if(betas != (32.0, 1.0), f"rope_parameters beta_fast/beta_slow={betas}",
               "llama.cpp's deepseek2 uses its default YaRN betas 32 / 1")
    _refuse_if(not rope.get("truncate", True), "rope_parameters truncate=false",
               "llama.cpp's YaRN rounds the correction range to whole dimensions")
    writer.add_rope_scaling_yarn_log_mul(0.1 * float(scale))


def _experts_keys(writer, family: Family, hf) -> None:
    """Expert count, top-k and per-expert width; the top-k renormalization llama.cpp fixes."""
    count = (getattr(hf, "num_experts", None) or getattr(hf, "num_local_experts", None)
             or hf.n_routed_experts)
    writer.add_expert_count(int(count))
    writer.add_expert_used_count(int(hf.num_experts_per_tok))
    width = getattr(hf, "moe_intermediate_size", None) or hf.intermediate_size
    writer.add_expert_feed_forward_length(int(width))
    norm = getattr(hf, "norm_topk_prob", True)  # Mixtral always renormalizes
    # (an MLA family writes its norm as a key: _deepseek_keys)
    _refuse_if(family.norm_topk is not None and bool(norm) != family.norm_topk,
               f"norm_topk_prob={str(norm).lower()}",
               f"llama.cpp's {gguf_arch_name(family)} "
               f"{'renormalizes' if family.norm_topk else 'does not renormalize'} the top-k "
               "routing weights")


# Mixture-of-experts architectures gguf-py names but loratune does not write yet, and why.
NOT_WRITTEN: dict[str, str] = {}
# llama.cpp's deepseek2 multiplies these with ggml_mul_mat, not build_lora_mm
_MLA_PROJECTIONS = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj")

FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family("LLAMA", interleaved_rope=True),
    "MistralForCausalLM": Family("LLAMA", interleaved_rope=True),
    "Qwen2ForCausalLM": Family("QWEN2"),
    "Qwen3ForCausalLM": Family("QWEN3"),
    # the language model of Qwen2_5_VLForConditionalGeneration, as gguf_vision writes it
    "Qwen2_5_VLForCausalLM": Family("QWEN2VL", keys=_qwen2vl_keys),
    "Gemma2ForCausalLM": Family("GEMMA2", norm_offset=1.0, keys=_gemma2_keys),
    "Gemma3ForCausalLM": Family("GEMMA3", norm_offset=1.0, keys=_gemma3_keys),
    "Phi3ForCausalLM": Family("PHI3", keys=_phi3_keys),
    "Qwen3MoeForCausalLM": Family("QWEN3MOE", keys=_qwen3moe_keys, norm_topk=True),
    "MixtralForCausalLM": Family("LLAMA", interleaved_rope=True, keys=_mixtral_keys,
                                 norm_topk=True),
    "OlmoeForCausalLM": Family("OLMOE", keys=_olmoe_keys, norm_topk=False),
    "DeepseekV2ForCausalLM": Family("DEEPSEEK2", keys=_deepseek_keys, mla=True,
                                    no_lora=_MLA_PROJECTIONS),
    "DeepseekV3ForCausalLM": Family("DEEPSEEK2", keys=_deepseek_keys, mla=True,
                                    no_lora=_MLA_PROJECTIONS),
    "GptOssForCausalLM": Family("GPT_OSS", keys=_gpt_oss_keys, norm_topk=True,
                                interleaved_experts=True),
}
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
               "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
               "qwen2_5_vl_text": "Qwen2_5_VLForCausalLM",
               "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
               "phi3": "Phi3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
               "mixtral": "MixtralForCausalLM", "olmoe": "OlmoeForCausalLM",
               "gpt_oss": "GptOssForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM",
               "deepseek_v3": "DeepseekV3ForCausalLM"}


def family_of(config: dict, where: str) -> tuple[str, Family]:
    """(HF architecture, Family) of a config.json, or an error naming the supported ones."""
    arch = (config.get("architectures") or [MODEL_TYPES.get(config.get("model_type"),
                                                            config.get("model_type"))])[0]
    return arch, supported(FAMILIES, NOT_WRITTEN, arch, "architecture", where)


def supported(table: dict, refused: dict[str, str], key: str, what: str, where: str):
    """table[key]; else an error saying why `key` (a `what`) is not written (refused[key]) or
    which keys are."""
    if key in refused:
        raise GGUFExportError(f"{where}: {what} {key} is not supported for GGUF export: "
                              f"{refused[key]}; export it as a Hugging Face folder (export hf) "
                              "instead")
    if key not in table:
        raise GGUFExportError(f"{where}: {what} {key} is not supported for GGUF export; "
                              f"supported: {', '.join(table)}")
    return table[key]


def hf_config(config: dict):
    """transformers' config object (its defaults filled in, RoPE parameters standardized)."""
    from transformers import AutoConfig

    return AutoConfig.for_model(**config)


def gguf_arch_name(family: Family) -> str:
    import gguf

    return gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, family.arch)]


def tensor_name_map(family: Family, n_layers: int):
    import gguf

    return gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, family.arch), n_layers)


def _rope_scaling(writer, family: Family, hf) -> dict[str, torch.Tensor]:
    """Write the RoPE scaling keys; returns the extra tensors it needs (name -> values)."""
    import gguf

    rope = _rope(hf)
    kind = rope.get("rope_type", "default")
    tensors = gguf.MODEL_TENSORS[getattr(gguf.MODEL_ARCH, family.arch)]
    if kind == "default":
        return {}
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        return {}
    if kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope.get("original_max_position_embeddings")
                                                 or hf.max_position_embeddings))
        for key, add in (("attention_factor", writer.add_rope_scaling_yarn_attn_factor),
                         ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow)):
            if rope.get(key) is not None:
                add(float(rope[key]))
        return {}
    if kind == "llama3" and gguf.MODEL_TENSOR.ROPE_FREQS in tensors:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        # llama.cpp divides each default frequency by a factor read from `rope_freqs`
        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, torch.device("cpu"))
        dim = int(_head_dim(hf) * rope.get("partial_rotary_factor", 1.0))
        base = float(rope["rope_theta"])
        default = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        return {"rope_freqs.weight": (default / scaled.double()).float()}
    if kind == "longrope" and gguf.MODEL_TENSOR.ROPE_FACTORS_LONG in tensors:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        _, attention_factor = ROPE_INIT_FUNCTIONS["longrope"](hf, torch.device("cpu"))
        writer.add_rope_scaling_attn_factors(float(attention_factor))
        return {"rope_factors_long.weight": torch.tensor(rope["long_factor"], dtype=torch.float32),
                "rope_factors_short.weight": torch.tensor(rope["short_factor"],
                                                          dtype=torch.float32)}
    raise GGUFExportError(f"config.json: rope scaling {kind!r} is not supported for the "
                          f"{gguf_arch_name(family)} architecture in GGUF export")


def write_metadata(writer, family: Family, config: dict, name: str,
                   file_type: int) -> dict[str, torch.Tensor]:
    """All the architecture keys; returns the extra tensors (RoPE factors) to write."""
    hf = hf_config(config)
    heads = hf.num_attention_heads
    head_dim = _head_dim(hf)
    writer.add_name(name)
    writer.add_context_length(int(hf.max_position_embeddings))
    writer.add_embedding_length(hf.hidden_size)
    writer.add_block_count(hf.num_hidden_layers)
    writer.add_feed_forward_length(hf.intermediate_size)
    writer.add_head_count(heads)
    rope = _rope(hf)
    if not family.mla:  # MLA's head sizes are its keys' (_deepseek_keys)
        writer.add_head_count_kv(getattr(hf, "num_key_value_heads", None) or heads)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(int(head_dim * rope.get(
            "partial_rotary_factor", getattr(hf, "partial_rotary_factor", None) or 1.0)))
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(hf.rms_norm_eps))
    writer.add_vocab_size(hf.vocab_size)
    writer.add_file_type(file_type)
    if family.keys is not None:
        family.keys(writer, config, hf)
    if family.norm_topk is not None or family.mla:
        _experts_keys(writer, family, hf)
    return _rope_scaling(writer, family, hf)
