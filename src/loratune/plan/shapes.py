"""Model shapes the memory planner reasons about: presets, or read from a config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from loratune.models.shapes import LLAMA_SHAPES

LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down


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

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of one decoder layer's linear layers."""
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]

    @property
    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linear_shapes())

    @property
    def other_params(self) -> int:
        """Embeddings, the output layer (unless tied) and the RMSNorm weights."""
        emb = self.vocab * self.hidden
        return emb * (1 if self.tie_embeddings else 2) + (2 * self.layers + 1) * self.hidden

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params

    def lora_params(self, rank: int) -> int:
        return self.layers * sum(rank * (a + b) for a, b in self.linear_shapes())

    @classmethod
    def from_hf_config(cls, config, name: str = "custom") -> "ModelShape":
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        needed = ("hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "vocab_size")
        missing = [k for k in needed if not isinstance(get(k), int)]
        if missing:
            raise ValueError(f"{name}: config has no {', '.join(missing)} (the planner knows "
                             f"Llama-style decoders)")
        heads = get("num_attention_heads")
        return cls(name=name, hidden=get("hidden_size"), intermediate=get("intermediate_size"),
                   layers=get("num_hidden_layers"), heads=heads,
                   kv_heads=get("num_key_value_heads") or heads, vocab=get("vocab_size"),
                   tie_embeddings=bool(get("tie_word_embeddings", False)))


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
