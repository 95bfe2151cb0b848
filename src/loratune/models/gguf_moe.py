"""Mixture-of-experts GGUF files (llama.cpp's qwen3moe, llama with experts, olmoe, gpt-oss,
deepseek2 as DeepSeek-V3 or, routed by softmax, V2) read into transformers' model classes by
loratune itself.

transformers' GGUF reader cannot do it: it has no olmoe, reads a `llama` file with experts as a
dense Llama whose MLPs stay randomly initialised (a warning, not an error), and drops
qwen3moe's per-expert width. Here the config comes from the file's keys (the inverse of
export/gguf_arch.py), each model parameter from the tensor gguf's own name map gives it, the
routed experts from the stacked [experts, out, in] tensors (gate and up joined into
transformers' fused `gate_up_proj`), and llama's interleaved Q/K rows put back; gpt-oss's experts
transposed back with gate/up interleaved, its sliding layers and YaRN as llama.cpp's graph
hard-codes them; deepseek2's kv_b_proj joined back from attn_k_b / attn_v_b, its YaRN from
the log multiplier (mscale = mscale_all_dim, as llama.cpp takes them). A setting the
file cannot say exactly (other RoPE scaling, partial rotary) or a tensor left over or missing
is refused by name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from loratune.models.gguf_config import GGUFLoadError

# llama.cpp architecture -> (transformers model_type, its expert-count field, top-k renormalized:
# the constant each llama.cpp graph uses)
ARCHS = {"qwen3moe": ("qwen3_moe", "num_experts", True),
         "llama": ("mixtral", "num_local_experts", True),
         "olmoe": ("olmoe", "num_experts", False),
         "gpt-oss": ("gpt_oss", "num_local_experts", True),
         "deepseek2": ("deepseek_v3", "n_routed_experts", None)}


def is_moe_gguf(path: Path) -> bool:
    """A file whose architecture keys name routed experts (expert_count > 0). Asked of every
    GGUF loaded, so read with transformers' header reader, which walks past the vocabulary
    (0.06 s for SmolLM2's file, where gguf's GGUFReader, decoding every token, took 15 s)."""
    from transformers.integrations.gguf.reader import read_gguf_metadata

    meta, _ = read_gguf_metadata(str(path))
    return bool(meta.get(f"{meta['general.architecture']}.expert_count"))


def _refuse(path: Path, key: str, why: str) -> GGUFLoadError:
    return GGUFLoadError(f"{path}: {key}: {why}; loratune reads mixture-of-experts GGUF files "
                         f"of the architectures {', '.join(ARCHS)} without it")


def moe_config(path: Path, meta: dict, tensors: set[str]):
    """transformers' config of the model in MoE GGUF `path` (metadata `meta`)."""
    from transformers import AutoConfig

    arch = meta["general.architecture"]
    if arch not in ARCHS:
        raise _refuse(path, f"general.architecture={arch}", "not a known MoE architecture")
    model_type, count_field, norm_topk = ARCHS[arch]

    def get(key: str, default=None):
        return meta.get(f"{arch}.{key}", default)

    heads, hidden = get("attention.head_count"), get("embedding_length")
    head_dim = get("attention.key_length") or hidden // heads
    rope = _rope_parameters(path, arch, get, tensors)
    if arch != "deepseek2" and get("rope.dimension_count", head_dim) != head_dim:
        raise _refuse(path, f"{arch}.rope.dimension_count", "partial rotary is not read")
    fields = dict(
        vocab_size=get("vocab_size") or len(meta["tokenizer.ggml.tokens"]),
        hidden_size=hidden, num_hidden_layers=get("block_count"), num_attention_heads=heads,
        num_key_value_heads=get("attention.head_count_kv", heads), head_dim=head_dim,
        max_position_embeddings=get("context_length"), rms_norm_eps=get(
            "attention.layer_norm_rms_epsilon"), intermediate_size=get("feed_forward_length"),
        rope_parameters=rope,
        num_experts_per_tok=get("expert_used_count"), tie_word_embeddings=(
            "output.weight" not in tensors), **{count_field: get("expert_count")},
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"))
    if model_type == "qwen3_moe":
        fields["moe_intermediate_size"] = get("expert_feed_forward_length")
    if arch == "deepseek2":
        model_type = _deepseek_model_type(path, get)
        fields.update(_deepseek_fields(path, get, model_type))
    elif model_type == "gpt_oss":  # llama.cpp's gpt-oss: even layers slide, odd ones do not
        fields.update(sliding_window=get("attention.sliding_window"), layer_types=[
            "sliding_attention" if i % 2 == 0 else "full_attention"
            for i in range(fields["num_hidden_layers"])])
    elif model_type != "mixtral":  # Mixtral has no switch: it always renormalizes
        fields["norm_topk_prob"] = norm_topk
    return AutoConfig.for_model(model_type, **fields)


def _deepseek_model_type(path: Path, get) -> str:
    """deepseek2's routing names the model: sigmoid is DeepSeek-V3's, softmax V2's."""
    gating = get("expert_gating_func")
    if gating not in (1, 2):  # llama.cpp's SOFTMAX, SIGMOID
        raise _refuse(path, f"deepseek2.expert_gating_func={gating}",
                      "only softmax (DeepSeek-V2) or sigmoid (V3) routing is read")
    return "deepseek_v3" if gating == 2 else "deepseek_v2"


def _deepseek_fields(path: Path, get, model_type: str) -> dict:
    """DeepSeek's config from llama.cpp's deepseek2 keys: MLA sizes (q_lora_rank 0: q_proj),
    dense lead layers, shared experts, V3's sigmoid routing in groups or V2's softmax top-k
    (the inverse of gguf_arch._deepseek_keys)."""
    rope = get("rope.dimension_count")
    fields = dict(
        q_lora_rank=get("attention.q_lora_rank") or None, kv_lora_rank=get(
            "attention.kv_lora_rank"), qk_rope_head_dim=rope, head_dim=rope,
        qk_nope_head_dim=get("attention.key_length_mla") - rope,
        v_head_dim=get("attention.value_length_mla"),
        num_key_value_heads=get("attention.head_count"),
        moe_intermediate_size=get("expert_feed_forward_length"),
        first_k_dense_replace=get("leading_dense_block_count", 0),
        n_shared_experts=get("expert_shared_count"),
        routed_scaling_factor=get("expert_weights_scale", 1.0),
        n_group=get("expert_group_count", 1), topk_group=get("expert_group_used_count", 1),
        attention_bias=False)
    norm = bool(get("expert_weights_norm", False))
    if model_type == "deepseek_v3":
        return {**fields, "norm_topk_prob": norm, "rope_interleave": True}
    if norm or fields["n_group"] > 1:
        raise _refuse(path, f"deepseek2.expert_weights_norm={norm}, expert_group_count="
                      f"{fields['n_group']}", "softmax routing (DeepSeek-V2) is read as plain "
                      "top-k, never renormalized")
    return {**fields, "topk_method": "greedy"}


def _rope_parameters(path: Path, arch: str, get, tensors: set[str]) -> dict:
    """transformers' rope_parameters from the file's keys: plain RoPE, or (gpt-oss) YaRN as
    llama.cpp computes it there: its correction range rounded (truncate), betas 32 / 1."""
    theta = get("rope.freq_base", 10000.0)
    kind = get("rope.scaling.type")
    if kind == "yarn" and arch == "deepseek2":
        return _deepseek_yarn(path, get, theta)
    if kind == "yarn" and arch == "gpt-oss" and "rope_freqs.weight" not in tensors:
        return {"rope_type": "yarn", "rope_theta": theta, "factor": get("rope.scaling.factor"),
                "original_max_position_embeddings": get(
                    "rope.scaling.original_context_length"),
                "beta_fast": 32.0, "beta_slow": 1.0, "truncate": True}
    if kind not in (None, "none") or "rope_freqs.weight" in tensors:
        raise _refuse(path, f"{arch}.rope.scaling", "RoPE scaling is not read")
    return {"rope_type": "default", "rope_theta": theta}


def _deepseek_yarn(path: Path, get, theta: float) -> dict:
    """deepseek2's YaRN as llama.cpp runs it: mscale and mscale_all_dim both the stored log
    multiplier / 0.1, betas 32 / 1, the correction range rounded."""
    log_mul = get("rope.scaling.yarn_log_multiplier")
    if not log_mul:
        raise _refuse(path, "deepseek2.rope.scaling.yarn_log_multiplier",
                      "YaRN without it scales q·k by (0.1·ln(factor) + 1)² in llama.cpp, which "
                      "no transformers setting does")
    scale = float(np.float32(log_mul)) / 0.1
    return {"rope_type": "yarn", "rope_theta": theta, "factor": get("rope.scaling.factor"),
            "original_max_position_embeddings": get("rope.scaling.original_context_length"),
            "mscale": scale, "mscale_all_dim": scale, "beta_fast": 32.0, "beta_slow": 1.0,
            "truncate": True}


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's interleaved Q/K rows back to transformers' [first halves | second halves]
    (the inverse of export.gguf_arch.rope_permute)."""
    rows = w.shape[0]
    return (w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2)
            .reshape(w.shape))


def _values(t) -> torch.Tensor:
    from gguf import dequantize

    x = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
    return torch.from_numpy(x.reshape([int(n) for n in reversed(t.shape.tolist())]).copy())


def _interleave(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """GPT-OSS's fused last dimension: gate and up columns alternating."""
    return torch.stack([gate, up], dim=-1).flatten(-2)


class _Tensors:
    """The file's tensors by gguf name, each read once; llama's Q/K rows put back."""

    def __init__(self, path: Path, reader, config, arch: str):
        import gguf

        self.path, self.arch, self.config = path, arch, config
        self.by_name = {t.name: t for t in reader.tensors}
        self.used: set[str] = set()
        self.names = gguf.get_tensor_name_map(
            next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch),
            config.num_hidden_layers)

    def get(self, hf: str) -> torch.Tensor:
        name = self.names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is None or name not in self.by_name:
            raise GGUFLoadError(f"{self.path}: no tensor for {hf} (expected "
                                f"{name or 'a name in ' + self.arch + ' architecture'})")
        self.used.add(name)
        t = _values(self.by_name[name])
        if self.arch == "llama" and hf.endswith(("q_proj.weight", "k_proj.weight")):
            heads = self.config.num_attention_heads
            t = _unpermute(t, heads if "q_proj" in hf else self.config.num_key_value_heads)
        return t

    def parameter(self, key: str) -> torch.Tensor:
        """transformers' parameter `key`; fused experts from the stacked projections."""
        if key.endswith(".experts.gate_up_proj") and self.arch == "gpt-oss":
            path = key.removesuffix(".gate_up_proj")
            return _interleave(self.get(f"{path}.gate_proj.weight").transpose(1, 2),
                               self.get(f"{path}.up_proj.weight").transpose(1, 2))
        if key.endswith(".experts.gate_up_proj"):
            path = key.removesuffix(".gate_up_proj")
            return torch.cat([self.get(f"{path}.gate_proj.weight"),
                              self.get(f"{path}.up_proj.weight")], dim=1)
        if key.endswith(".experts.down_proj"):
            down = self.get(f"{key}.weight")
            return down.transpose(1, 2).contiguous() if self.arch == "gpt-oss" else down
        if key.endswith(".self_attn.kv_b_proj.weight"):  # from deepseek2's attn_k_b, attn_v_b
            k_b = self.get(key.replace("kv_b_proj", "k_b_proj")).transpose(1, 2)
            per_head = torch.cat([k_b, self.get(key.replace("kv_b_proj", "v_b_proj"))], dim=1)
            return per_head.reshape(-1, per_head.shape[-1])
        if key.endswith(".e_score_correction_bias"):
            return self.get(key.replace("e_score_correction_bias", "e_score_correction.bias"))
        if key.endswith(".self_attn.sinks"):  # llama.cpp's attn_sinks.weight
            return self.get(f"{key}.weight")
        if key.endswith(".experts.down_proj_bias"):
            return self.get(key.replace("down_proj_bias", "down_proj.bias"))
        if key.endswith(".experts.gate_up_proj_bias"):
            path = key.removesuffix(".gate_up_proj_bias")
            return _interleave(self.get(f"{path}.gate_proj.bias"),
                               self.get(f"{path}.up_proj.bias"))
        return self.get(key)


def read_moe_gguf(path: Path, dtype: torch.dtype, attention: str | None = None):
    """The model in MoE GGUF `path`, in `dtype`, every parameter from the file."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    path = Path(path)
    reader = GGUFReader(str(path))
    meta = {k: f.contents() for k, f in reader.fields.items()}
    config = moe_config(path, meta, {t.name for t in reader.tensors})
    if attention is not None:
        config._attn_implementation = attention
    with no_init_weights():  # no random init of a model every parameter of is read below
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors = _Tensors(path, reader, config, meta["general.architecture"])
    tied = config.tie_word_embeddings
    state = {k: tensors.parameter(k).to(dtype) for k in model.state_dict()
             if not (tied and k == "lm_head.weight")}
    left = sorted(set(tensors.by_name) - tensors.used)
    if left:
        raise GGUFLoadError(f"{path}: tensor {left[0]} ({len(left)} in all) has no parameter "
                            f"in transformers' {config.model_type}")
    model.load_state_dict(state, strict=not tied)
    return model
