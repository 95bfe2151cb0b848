"""Prefix tuning (Li & Liang 2021): trained keys and values in front of every attention layer.

A `PrefixHost` at `model.prefix_encoder` shares the prompt host's decoder hooks: when a sequence
starts, the active adapter's prefixes fill the (new or empty) KV cache, so every layer attends
to num_virtual_tokens extra keys/values; the mask gets them too and real positions start after
them, as in PEFT. Prefixes have the KV width (kv_heads * head_dim), so GQA models work.

File layout (PEFT's `prompt_embeddings`): [num_virtual_tokens, layers * 2 * kv_dim], per token
layer 0 keys, layer 0 values, layer 1 keys, ... With prefix_projection, PEFT saves the prefixes
the MLP computes (not the MLP); so do we (`saved_tensors`). Loading such a file (through
`file_tensors`) gives the adapter a prefix table that replaces the MLP, as in PEFT's inference
mode: the same prefixes, hence the same logits, and training continues on the table.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from loratune.adapters.host import adapter_dtype
from loratune.adapters.peft_format import CONFIG_NAME, PeftFolder
from loratune.adapters.prompt import (NO_LEAD_COMPOSITION, NO_PACKING, PEFT_COMMON, PromptHost,
                                      find_decoder, place_host)
from loratune.adapters.registry import (AdapterError, FileSpec, MergeSpec, MethodRecord, RowLead,
                                        ServingSpec, TrainingSpec, register)
from loratune.config import PrefixConfig


def model_dims(model: nn.Module, where: str | None = None) -> dict[str, int]:
    """Sizes from the model config: hidden, layers, heads, kv_heads, head_dim. `where` (a file)
    leads the error of a model no prefix fits."""
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    need = ("hidden_size", "num_hidden_layers", "num_attention_heads")
    if cfg is None or any(getattr(cfg, k, None) is None for k in need):
        raise AdapterError(f"{type(model).__name__}.config must give {', '.join(need)}")
    if getattr(cfg, "kv_lora_rank", None):
        # MLA (DeepSeek-V2/V3) caches one latent and one rotary key per token, shared by
        # every head: per-head prefix keys and values have no place in that cache
        raise AdapterError(f"{where + ': ' if where else ''}prefix tuning needs per-head keys "
                           f"and values in the KV cache; {type(model).__name__} uses multi-head "
                           f"latent attention (kv_lora_rank={cfg.kv_lora_rank}), whose cache "
                           "holds a latent per token instead. Use LoRA or prompt tuning")
    heads = cfg.num_attention_heads
    return {"hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers, "heads": heads,
            "kv_heads": getattr(cfg, "num_key_value_heads", None) or heads,
            "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads}


class PrefixEncoder(nn.Module):
    """Per-layer key/value prefixes, optionally reparameterized as in PEFT's PrefixEncoder.

    Plain: `embedding.weight` is the prefix table. Projection: embedding [n, hidden] -> Linear ->
    Tanh -> Linear(.., layers*2*kv_dim); Li & Liang found direct optimization unstable.
    """

    def __init__(self, config: PrefixConfig, dims: dict[str, int], device=None, dtype=None):
        super().__init__()
        self.config = config
        self.layers, self.kv_heads = dims["layers"], dims["kv_heads"]
        self.head_dim = dims["head_dim"]
        out = self.layers * 2 * self.kv_heads * self.head_dim
        kw = {"device": device, "dtype": dtype}
        n = config.num_virtual_tokens
        # nn.Embedding's N(0, 1) init, as PEFT
        if config.prefix_projection:
            width = config.encoder_hidden_size or dims["hidden"]
            self.embedding = nn.Embedding(n, dims["hidden"], **kw)
            self.transform = nn.Sequential(nn.Linear(dims["hidden"], width, **kw), nn.Tanh(),
                                           nn.Linear(width, out, **kw))
        else:
            self.embedding = nn.Embedding(n, out, **kw)
            self.transform = None
        self.register_parameter("table", None)  # set when a file's prefixes are loaded

    def prefixes(self) -> torch.Tensor:
        """[num_virtual_tokens, layers * 2 * kv_dim]."""
        if self.table is not None:
            return self.table
        weight = self.embedding.weight
        return weight if self.transform is None else self.transform(weight)

    def load_target(self) -> torch.Tensor:
        """The tensor a file's `prompt_embeddings` is copied into."""
        if self.transform is None:
            return self.embedding.weight
        if self.table is None:
            with torch.no_grad():
                start = self.transform(self.embedding.weight)
            self.table = nn.Parameter(start, requires_grad=self.embedding.weight.requires_grad)
        return self.table

    def key_values(self, batch: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, ...]]:
        """Per layer (keys, values), each [batch, kv_heads, num_virtual_tokens, head_dim]."""
        per_layer = split_prefixes(self.prefixes().to(dtype), self.layers, self.kv_heads,
                                   self.head_dim)
        return [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in per_layer]


def split_prefixes(table: torch.Tensor, layers: int, kv_heads: int, head_dim: int
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """PEFT's table [n, layers * 2 * kv_dim] -> per layer (keys, values) [1, kv_heads, n,
    head_dim] (per token: layer 0 keys, layer 0 values, layer 1 keys, ...)."""
    kv = table.view(table.shape[0], layers * 2, kv_heads, head_dim).permute(1, 2, 0, 3)
    return [(kv[2 * i][None], kv[2 * i + 1][None]) for i in range(layers)]


class PrefixHost(PromptHost):
    """Holds prefix adapters; one runs at a time."""

    kind = "prefix"

    def inject(self, decoder, adapter, kwargs: dict, past: int) -> dict:
        n = adapter.config.num_virtual_tokens
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + n
        if past:  # decode step: the prefixes are in the cache
            return kwargs
        if decoder.training and any(getattr(m, "gradient_checkpointing", False)
                                    for m in decoder.modules()):
            raise AdapterError("prefix tuning cannot train with gradient checkpointing: "
                               "transformers drops the KV cache, which holds the prefixes, in "
                               "checkpointed layers (set train.gradient_checkpointing: false)")
        cache = kwargs.get(self.cache_key)
        if cache is None:  # also without use_cache: the layers read the prefixes from it
            cache = DynamicCache(config=decoder.config)
        inputs = kwargs.get("inputs_embeds")
        batch = (inputs if inputs is not None else kwargs["input_ids"]).shape[0]
        dtype = decoder.get_input_embeddings().weight.dtype
        for layer, (keys, values) in enumerate(adapter.key_values(batch, dtype)):
            cache.update(keys, values, layer)
        kwargs[self.cache_key] = cache
        return kwargs

    def file_tensors(self, name: str, path: str) -> dict[str, torch.Tensor]:
        """Load targets (see the module docstring for prefix_projection)."""
        return {"prompt_embeddings": self.adapters[name].load_target()}

    def saved_tensors(self, name: str, path: str) -> dict[str, torch.Tensor]:
        """What PEFT saves: the prefixes themselves, computed through the MLP if there is one."""
        return {"prompt_embeddings": self.adapters[name].prefixes()}


def _check_kv_width(decoder: nn.Module, width: int) -> None:
    """The prefixes must have the width of each layer's keys (k_proj's output, GQA included)."""
    for i, layer in enumerate(getattr(decoder, "layers", [])):
        k_proj = getattr(getattr(layer, "self_attn", None), "k_proj", None)
        if getattr(k_proj, "out_features", width) != width:
            raise AdapterError(f"layers.{i}.self_attn.k_proj gives {k_proj.out_features} "
                               f"features; the config implies {width} (kv heads * head_dim)")


def attach_prefix(model: nn.Module, config: PrefixConfig, name: str, tokenizer=None) -> None:
    """Add prefix adapter `name` at `model.prefix_encoder`; it becomes the active one there.

    `tokenizer` is unused (the signature is shared with the other model-level methods).
    """
    decoder = find_decoder(model)
    dims = model_dims(model)
    _check_kv_width(decoder, dims["kv_heads"] * dims["head_dim"])
    weight = decoder.get_input_embeddings().weight
    adapter = PrefixEncoder(config, dims, device=weight.device,
                            dtype=adapter_dtype(config, weight.dtype))
    place_host(model, "prefix_encoder", PrefixHost, name, adapter)


def peft_config(model: nn.Module, config: PrefixConfig) -> dict:
    """adapter_config.json as PEFT writes it for PREFIX_TUNING (token_dim = the KV width)."""
    d = model_dims(model)
    kv_dim = d["kv_heads"] * d["head_dim"]
    return {**PEFT_COMMON, "peft_type": "PREFIX_TUNING", "num_virtual_tokens":
            config.num_virtual_tokens, "token_dim": kv_dim, "num_attention_heads": d["kv_heads"],
            "num_layers": d["layers"], "prefix_projection": config.prefix_projection,
            "encoder_hidden_size": config.encoder_hidden_size or d["hidden"], "init_weights": None}


def why_no_resume(config: PrefixConfig) -> str | None:
    # A checkpoint is an adapter file, and PEFT's file holds the prefixes the MLP computed.
    if config.prefix_projection:
        return ("with prefix_projection, checkpoints hold the computed prefixes, not the MLP; "
                "train without prefix_projection to resume")
    return None


def check_file_dims(raw: dict, model: nn.Module, where: str) -> None:
    """The model the file was saved for, as its adapter_config.json says (PEFT's fields), must
    be this one: another model whose layers x kv heads x head_dim give the same width would
    pass the table's shape and get its keys and values split across the wrong layers."""
    d = model_dims(model, where)
    fields = {"num_layers": (d["layers"], "layers"),
              "num_attention_heads": (d["kv_heads"], "key/value heads"),
              "token_dim": (d["kv_heads"] * d["head_dim"], "as the width of a layer's keys")}
    for field, (ours, what) in fields.items():
        theirs = raw.get(field)
        if theirs is not None and theirs != ours:
            raise AdapterError(f"{where}: {field} is {theirs!r}; this model has {ours} ({what}): "
                               "the prefix was trained for another model")


def before_load(model: nn.Module, name: str, raw: dict, tensors: dict) -> None:
    check_file_dims(raw, model, CONFIG_NAME)


def prefix_lead(adapter: PeftFolder, model: nn.Module) -> RowLead:
    """The file's prefixes as per-layer keys and values for the served model's KV cache."""
    check_file_dims(adapter.raw, model, str(adapter.folder / CONFIG_NAME))
    d = model_dims(model)
    table = adapter.tensors.get("prompt_embeddings")
    want = (adapter.config.num_virtual_tokens, d["layers"] * 2 * d["kv_heads"] * d["head_dim"])
    if table is None or tuple(table.shape) != want:
        got = "no prompt_embeddings" if table is None else f"shape {tuple(table.shape)}"
        raise AdapterError(f"{adapter.weights_path}: prompt_embeddings has {got}; this model "
                           f"needs {want} (num_virtual_tokens, layers * 2 * kv_heads * head_dim)")
    per_layer = split_prefixes(table.float(), d["layers"], d["kv_heads"], d["head_dim"])
    return RowLead(key_values=[(k[0], v[0]) for k, v in per_layer])


register(MethodRecord(
    name="prefix", config_class=PrefixConfig, peft_type="PREFIX_TUNING",
    files=FileSpec(("prompt_embeddings",),
                   peft_fields=lambda model, name, config, compact: peft_config(model, config),
                   before_load=before_load),
    attach=attach_prefix,
    training=TrainingSpec(why_no_packing=NO_PACKING,
                          virtual_tokens=lambda config: config.num_virtual_tokens,
                          why_no_resume=why_no_resume),
    merge=MergeSpec(why_not="prefix tuning adds key/value prefixes, not weights: there is "
                            "nothing to fold in"),
    serving=ServingSpec(lead=prefix_lead, why_no_composition=NO_LEAD_COMPOSITION)))
