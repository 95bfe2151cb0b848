"""Model shapes the memory planner reasons about: presets, or read from a config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from loratune.models.shapes import LLAMA_SHAPES

# model_type -> what its decoder layer holds beyond the Llama layout. The planner counts
# these decoders exactly (tested against the real models); any other model_type is refused.
KNOWN = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
         "qwen3_moe", "mixtral", "olmoe", "gpt_oss", "deepseek_v2", "deepseek_v3")
_NORMS_PER_LAYER = {"gemma2": 4, "gemma3_text": 4}  # + pre/post feed-forward norms
_QK_NORM = ("qwen3", "gemma3_text", "qwen3_moe")                 # RMSNorm(head_dim) on queries and keys
_FUSED = ("phi3",)                                  # qkv_proj and gate_up_proj
# Mixture-of-experts decoders: every layer's MLP is a router ([experts, hidden], no bias) and
# routed SwiGLU experts: model_type -> the config key of one expert's intermediate size. The
# expert count is num_experts or num_local_experts (files and transformers 5 differ).
_MOE = {"qwen3_moe": "moe_intermediate_size", "mixtral": "intermediate_size",
        "olmoe": "intermediate_size", "gpt_oss": "intermediate_size",
        "deepseek_v2": "moe_intermediate_size", "deepseek_v3": "moe_intermediate_size"}
_FULL_QK_NORM = ("olmoe",)                          # RMSNorm over all of q and of k
# GPT-OSS: biases on the router and on every expert's gate_up and down, attention sinks (one
# logit per head) and attention biases. DeepSeek-V2/V3: multi-head latent attention (MLA),
# shared experts beside the routed ones, the first first_k_dense_replace layers dense.
_BIASED_EXPERTS = ("gpt_oss",)
_DEEPSEEK = ("deepseek_v2", "deepseek_v3")


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tie_embeddings: bool = False
    head_size: int | None = None     # config.head_dim where it is not hidden / heads (Qwen3)
    qkv_bias: bool = False           # biases on q, k, v (Qwen2)
    o_bias: bool = False
    mlp_bias: bool = False
    norms_per_layer: int = 2
    qk_norm: bool = False
    fused: bool = False              # q/k/v and gate/up as one layer each (Phi-3)
    qk_norm_full: bool = False       # q/k norms over q_dim/kv_dim, not head_dim (OLMoE)
    experts: int = 0                 # routed experts per layer (0: a dense MLP)
    experts_per_token: int = 0
    expert_intermediate: int = 0
    dense_layers: int = 0            # MoE models: leading layers with a dense MLP (DeepSeek)
    shared_intermediate: int = 0     # shared experts' MLP width (DeepSeek: n_shared x moe width)
    expert_bias: bool = False        # biases on the router and the experts (GPT-OSS)
    sinks: bool = False              # one attention-sink logit per head and layer (GPT-OSS)
    q_lora_rank: int = 0             # MLA (DeepSeek): q through a rank-q_lora_rank bottleneck
    kv_lora_rank: int = 0            # MLA: keys/values from one latent of this width (0: no MLA)
    qk_rope_dim: int = 0
    qk_nope_dim: int = 0
    v_head_dim: int = 0

    @property
    def head_dim(self) -> int:
        return self.head_size or self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        if self.kv_lora_rank:
            return self.heads * (self.qk_nope_dim + self.qk_rope_dim)
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of what attention keeps per token for k and v (MLA: its latent and rope key)."""
        if self.kv_lora_rank:
            return self.kv_lora_rank + self.qk_rope_dim
        return self.kv_heads * self.head_dim

    def attention_shapes(self) -> list[tuple[int, int]]:
        h, q, kv = self.hidden, self.q_dim, self.kv_dim
        if self.fused:
            return [(h, q + 2 * kv), (q, h)]
        if not self.kv_lora_rank:
            return [(h, q), (h, kv), (h, kv), (q, h)]
        qr, kvr = self.q_lora_rank, self.kv_lora_rank
        query = [(h, qr), (qr, q)] if qr else [(h, q)]
        return query + [(h, kv), (kvr, self.heads * (self.qk_nope_dim + self.v_head_dim)),
                        (self.heads * self.v_head_dim, h)]

    def mlp_shapes(self, dense: bool) -> list[tuple[int, int]]:
        """A dense layer's MLP, or an MoE layer's shared experts (routed experts are no linears)."""
        h, i = self.hidden, self.intermediate if dense else self.shared_intermediate
        if not i:
            return []
        return [(h, 2 * i), (i, h)] if self.fused else [(h, i), (h, i), (i, h)]

    def layer_kinds(self) -> list[tuple[int, list[tuple[int, int]]]]:
        """(how many layers, (in, out) of each linear layer) per kind of decoder layer."""
        kinds = [(self.dense_mlp_layers, self.attention_shapes() + self.mlp_shapes(True)),
                 (self.moe_layers, self.attention_shapes() + self.mlp_shapes(False))]
        return [(n, shapes) for n, shapes in kinds if n]

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of the linear layers of the widest kind of decoder layer (not the routed
        experts)."""
        return max((shapes for _, shapes in self.layer_kinds()),
                   key=lambda shapes: sum(a * b for a, b in shapes))

    @property
    def moe_layers(self) -> int:
        return self.layers - self.dense_layers if self.experts else 0

    @property
    def dense_mlp_layers(self) -> int:
        return self.layers - self.moe_layers

    @property
    def expert_weights(self) -> int:
        """Matrices of one routed expert (gate, up, down): what QLoRA holds in 4 bits."""
        return 3 * self.hidden * self.expert_intermediate

    @property
    def expert_size(self) -> int:
        """Parameters of one routed expert: its matrices, and GPT-OSS's biases."""
        return self.expert_weights + (2 * self.expert_intermediate + self.hidden) \
            * self.expert_bias

    @property
    def expert_params(self) -> int:
        """Every layer's routed experts (held as fused 3-D tensors, quantized per expert)."""
        return self.moe_layers * self.experts * self.expert_size

    @property
    def router_params(self) -> int:
        """Every MoE layer's router: [experts, hidden] (and a bias in GPT-OSS)."""
        return self.moe_layers * self.experts * (self.hidden + self.expert_bias)

    @property
    def active_params(self) -> int:
        """Parameters one token runs through: all but the routed experts it is not sent to."""
        return self.params - self.moe_layers * (self.experts - self.experts_per_token) \
            * self.expert_size

    @property
    def linears_per_layer(self) -> int:
        return len(self.linear_shapes())

    @property
    def linear_count(self) -> int:
        return sum(n * len(shapes) for n, shapes in self.layer_kinds())

    @property
    def linear_params(self) -> int:
        return sum(n * sum(a * b for a, b in shapes) for n, shapes in self.layer_kinds())

    @property
    def other_params(self) -> int:
        """Embeddings, the output layer (unless tied), norms and biases."""
        emb = self.vocab * self.hidden
        qk = self.q_dim + self.kv_dim if self.qk_norm_full else 2 * self.head_dim
        norms = self.norms_per_layer * self.hidden + (qk if self.qk_norm else 0) \
            + self.q_lora_rank + self.kv_lora_rank  # MLA's latent norms
        biases = ((self.q_dim + 2 * self.kv_dim) * self.qkv_bias + self.hidden * self.o_bias
                  + self.heads * self.sinks)
        mlp_biases = (2 * self.intermediate + self.hidden) * self.mlp_bias
        return emb * (1 if self.tie_embeddings else 2) + self.layers * (norms + biases) \
            + self.dense_mlp_layers * mlp_biases + self.router_params + self.hidden

    @property
    def params(self) -> int:
        return self.linear_params + self.expert_params + self.other_params

    def lora_params(self, rank: int) -> int:
        """LoRA on every linear layer (all-linear: attention, dense MLPs, shared experts)."""
        return sum(n * sum(rank * (a + b) for a, b in shapes) for n, shapes in self.layer_kinds())

    def expert_lora_params(self, rank: int) -> int:
        """LoRA on the routed experts ('experts' in target_modules): per expert, A [r, in] and
        B [out, r] of gate_up_proj (hidden -> 2 x width) and of down_proj (width -> hidden)."""
        h, i = self.hidden, self.expert_intermediate
        return self.moe_layers * self.experts * rank * ((h + 2 * i) + (i + h))

    @classmethod
    def from_hf_config(cls, config, name: str = "custom") -> "ModelShape":
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        kind = get("model_type") or "llama"
        if kind not in KNOWN:
            raise ValueError(f"{name}: the planner counts {', '.join(KNOWN)} decoders; "
                             f"model_type '{kind}' is not one of them")
        needed = ("hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "vocab_size")
        missing = [k for k in needed if not isinstance(get(k), int)]
        if missing:
            raise ValueError(f"{name}: config has no {', '.join(missing)} (the planner knows "
                             f"Llama-style decoders)")
        heads = get("num_attention_heads")
        experts, per_token, expert_i = (
            (get("num_experts") or get("num_local_experts") or get("n_routed_experts"),
             get("num_experts_per_tok"), get(_MOE[kind])) if kind in _MOE else (0, 0, 0))
        if not all(isinstance(v, int) for v in (experts, per_token, expert_i)):
            raise ValueError(f"{name}: a {kind} config needs num_experts (or num_local_experts, "
                             f"n_routed_experts), num_experts_per_tok and {_MOE[kind]}")
        if kind == "qwen3_moe" and (get("mlp_only_layers") or get("decoder_sparse_step", 1) != 1):
            raise ValueError(f"{name}: mlp_only_layers / decoder_sparse_step (dense layers among "
                             f"the MoE ones) are not counted by the planner")
        attention_bias = bool(get("attention_bias", False))
        return cls(name=name, hidden=get("hidden_size"), intermediate=get("intermediate_size"),
                   layers=get("num_hidden_layers"), heads=heads,
                   kv_heads=get("num_key_value_heads") or heads, vocab=get("vocab_size"),
                   # when the file does not say: the config class's default (Gemma ties)
                   tie_embeddings=bool(get("tie_word_embeddings", kind.startswith("gemma"))),
                   head_size=get("head_dim") or None,
                   qkv_bias=attention_bias or kind == "qwen2",
                   o_bias=attention_bias and kind not in ("qwen2",),
                   mlp_bias=bool(get("mlp_bias", False)),
                   norms_per_layer=_NORMS_PER_LAYER.get(kind, 2),
                   qk_norm=kind in _QK_NORM + _FULL_QK_NORM, fused=kind in _FUSED,
                   qk_norm_full=kind in _FULL_QK_NORM, experts=experts,
                   experts_per_token=per_token, expert_intermediate=expert_i,
                   expert_bias=kind in _BIASED_EXPERTS, sinks=kind in _BIASED_EXPERTS,
                   **(_deepseek_fields(get, name, expert_i) if kind in _DEEPSEEK else {}))


def _deepseek_fields(get, name: str, expert_i: int) -> dict:
    """MLA's dimensions, the shared experts and the leading dense layers of a DeepSeek config."""
    needed = ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
    missing = [k for k in needed if not isinstance(get(k), int)]
    if missing:
        raise ValueError(f"{name}: a DeepSeek config needs {', '.join(missing)} (multi-head "
                         "latent attention)")
    if get("moe_layer_freq", 1) != 1:
        raise ValueError(f"{name}: moe_layer_freq {get('moe_layer_freq')} (dense layers between "
                         "the MoE ones) is not counted by the planner")
    return {"dense_layers": get("first_k_dense_replace") or 0,
            "shared_intermediate": expert_i * (get("n_shared_experts") or 0),
            "q_lora_rank": get("q_lora_rank") or 0, "kv_lora_rank": get("kv_lora_rank"),
            "qk_rope_dim": get("qk_rope_head_dim"), "qk_nope_dim": get("qk_nope_head_dim"),
            "v_head_dim": get("v_head_dim")}


PRESETS: dict[str, ModelShape] = {
    name: ModelShape(name, dims["hidden_size"], dims["intermediate_size"],
                     dims["num_hidden_layers"], dims["num_attention_heads"],
                     dims["num_key_value_heads"], dims["vocab_size"])
    for name, dims in LLAMA_SHAPES.items()
}
PRESETS["smollm2-135m-instruct"] = ModelShape("smollm2-135m-instruct", 576, 1536, 30, 9, 3,
                                              49152, tie_embeddings=True)
# Qwen3-30B-A3B's config.json (the fields the planner reads): the MoE preset
QWEN3_30B_A3B = {"model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144,
                 "moe_intermediate_size": 768, "num_hidden_layers": 48,
                 "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
                 "num_experts": 128, "num_experts_per_tok": 8, "vocab_size": 151936,
                 "tie_word_embeddings": False}
PRESETS["qwen3-30b-a3b"] = ModelShape.from_hf_config(QWEN3_30B_A3B, "qwen3-30b-a3b")
ALIASES = {"7b": "llama-2-7b", "13b": "llama-2-13b", "70b": "llama-2-70b"}


def resolve_shape(name_or_path: str) -> ModelShape:
    """A preset name (7b, 13b, 70b, llama-2-7b, smollm2-135m-instruct, qwen3-30b-a3b), or a
    config.json."""
    key = ALIASES.get(name_or_path.lower(), name_or_path.lower())
    if key in PRESETS:
        return PRESETS[key]
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
            return ModelShape.from_hf_config(config, name=path.parent.name)
        except (json.JSONDecodeError, TypeError, KeyError) as err:
            raise ValueError(f"{path}: not a transformers decoder config ({err})") from None
    raise ValueError(f"unknown model '{name_or_path}': expected a preset "
                     f"({', '.join(sorted(PRESETS) + sorted(ALIASES))}) or a folder / "
                     f"config.json path")
