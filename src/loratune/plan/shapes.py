"""Model shapes the memory planner reasons about: presets, or read from a config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from loratune.models.shapes import LLAMA_SHAPES

# model_type -> what its decoder layer holds beyond the Llama layout. The planner counts
# these decoders exactly (tested against the real models); any other model_type is refused.
KNOWN = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
         "qwen3_moe", "mixtral", "olmoe")
_NORMS_PER_LAYER = {"gemma2": 4, "gemma3_text": 4}  # + pre/post feed-forward norms
_QK_NORM = ("qwen3", "gemma3_text", "qwen3_moe")                 # RMSNorm(head_dim) on queries and keys
_FUSED = ("phi3",)                                  # qkv_proj and gate_up_proj
# Mixture-of-experts decoders: every layer's MLP is a router ([experts, hidden], no bias) and
# routed SwiGLU experts: model_type -> the config key of one expert's intermediate size. The
# expert count is num_experts or num_local_experts (files and transformers 5 differ).
_MOE = {"qwen3_moe": "moe_intermediate_size", "mixtral": "intermediate_size",
        "olmoe": "intermediate_size"}
_FULL_QK_NORM = ("olmoe",)                          # RMSNorm over all of q and of k


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

    @property
    def head_dim(self) -> int:
        return self.head_size or self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of one decoder layer's linear layers (nn.Linear: not the routed experts)."""
        h, i, q, kv = self.hidden, self.intermediate, self.q_dim, self.kv_dim
        if self.fused:
            return [(h, q + 2 * kv), (q, h), (h, 2 * i), (i, h)]
        attention = [(h, q), (h, kv), (h, kv), (q, h)]
        return attention if self.experts else attention + [(h, i), (h, i), (i, h)]

    @property
    def expert_size(self) -> int:
        """Weights of one routed expert (gate, up, down)."""
        return 3 * self.hidden * self.expert_intermediate

    @property
    def expert_params(self) -> int:
        """Every layer's routed experts (held as fused 3-D tensors, quantized per expert)."""
        return self.layers * self.experts * self.expert_size

    @property
    def active_params(self) -> int:
        """Parameters one token runs through: all but the routed experts it is not sent to."""
        return self.params - self.layers * (self.experts - self.experts_per_token) \
            * self.expert_size

    @property
    def linears_per_layer(self) -> int:
        return len(self.linear_shapes())

    @property
    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linear_shapes())

    @property
    def other_params(self) -> int:
        """Embeddings, the output layer (unless tied), norms and biases."""
        emb = self.vocab * self.hidden
        qk = self.q_dim + self.kv_dim if self.qk_norm_full else 2 * self.head_dim
        norms = self.norms_per_layer * self.hidden + (qk if self.qk_norm else 0) \
            + self.experts * self.hidden  # the router
        biases = ((self.q_dim + 2 * self.kv_dim) * self.qkv_bias + self.hidden * self.o_bias
                  + (2 * self.intermediate + self.hidden) * self.mlp_bias)
        return emb * (1 if self.tie_embeddings else 2) + self.layers * (norms + biases) \
            + self.hidden

    @property
    def params(self) -> int:
        return self.linear_params + self.expert_params + self.other_params

    def lora_params(self, rank: int) -> int:
        return self.layers * sum(rank * (a + b) for a, b in self.linear_shapes())

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
            (get("num_experts") or get("num_local_experts"), get("num_experts_per_tok"),
             get(_MOE[kind])) if kind in _MOE else (0, 0, 0))
        if not all(isinstance(v, int) for v in (experts, per_token, expert_i)):
            raise ValueError(f"{name}: a {kind} config needs num_experts (or num_local_experts), "
                             f"num_experts_per_tok and {_MOE[kind]}")
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
                   experts_per_token=per_token, expert_intermediate=expert_i)


PRESETS: dict[str, ModelShape] = {
    name: ModelShape(name, dims["hidden_size"], dims["intermediate_size"],
                     dims["num_hidden_layers"], dims["num_attention_heads"],
                     dims["num_key_value_heads"], dims["vocab_size"])
    for name, dims in LLAMA_SHAPES.items()
}
PRESETS["smollm2-135m-instruct"] = ModelShape("smollm2-135m-instruct", 576, 1536, 30, 9, 3,
                                              49152, tie_embeddings=True)
ALIASES = {"7b": "llama-2-7b", "13b": "llama-2-13b", "70b": "llama-2-70b"}


def resolve_shape(name_or_path: str) -> ModelShape:
    """A preset name (7b, 13b, 70b, llama-2-7b, smollm2-135m-instruct), or a config.json."""
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
