"""Prompt tuning (Lester et al. 2021): trained virtual-token embeddings in front of every input.

A `PromptHost` at `model.prompt_encoder` holds the adapters; hooks on `model.get_decoder()` do
the rest. When a sequence starts (empty KV cache) the active adapter's embeddings go before the
input embeddings, the mask and positions are widened, and the decoder's output loses the virtual
positions again, so logits and the loss code see only the real tokens. Decode steps only widen
the mask (the virtual tokens are in the cache). The file holds PEFT's `prompt_embeddings`.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache

from loratune.adapters.host import AdapterHost, adapter_dtype
from loratune.adapters.peft_format import PeftFolder
from loratune.adapters.registry import (AdapterError, FileSpec, MergeSpec, MethodRecord, RowLead,
                                        ServingSpec, TrainingSpec, register)
from loratune.config import PromptConfig
from loratune.models.modules import CACHE_KEYWORDS, cache_keyword

# Keys PEFT writes for every prompt-learning method on a causal LM.
PEFT_COMMON = {"task_type": "CAUSAL_LM", "num_transformer_submodules": 1, "inference_mode": True,
               "base_model_name_or_path": None, "revision": None, "modules_to_save": None,
               "auto_mapping": None}
DECODER_INPUTS = "input_ids inputs_embeds attention_mask position_ids".split()


def find_decoder(model: nn.Module) -> nn.Module:
    """`model.get_decoder()`, checked to take the inputs the hooks rewrite."""
    try:
        decoder = model.get_decoder()
    except Exception:  # no such method, or transformers cannot map this model
        decoder = None
    decoder = decoder if isinstance(decoder, nn.Module) else None
    params = inspect.signature(decoder.forward).parameters if decoder is not None else {}
    missing = [p for p in DECODER_INPUTS if p not in params]
    if decoder is not None and cache_keyword(decoder.forward) is None:
        missing.append(" or ".join(CACHE_KEYWORDS))
    if decoder is None or missing:
        raise AdapterError(f"prompt/prefix tuning needs a transformers decoder-only model whose "
                           f"get_decoder() takes {', '.join(DECODER_INPUTS)} and a KV cache; "
                           f"{type(model).__name__} has {'none' if decoder is None else missing}")
    return decoder


def cache_length(cache) -> int:
    if cache is not None and not isinstance(cache, DynamicCache):
        kind = type(cache).__name__ if isinstance(cache, Cache) else "a legacy tuple cache"
        raise AdapterError(f"prompt/prefix tuning supports transformers' DynamicCache (generate's "
                           f"default), got {kind}; use cache_implementation='dynamic'")
    return 0 if cache is None else cache.get_seq_length()


class PromptHost(AdapterHost):
    """Holds prompt adapters (one runs at a time) and owns the decoder hooks (PrefixHost too)."""

    kind = "prompt"

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self._strip = 0  # virtual positions the output hook removes (set by the input hook)
        self._names = list(inspect.signature(decoder.forward).parameters)
        self.cache_key = cache_keyword(decoder.forward)
        self._handles = [decoder.register_forward_pre_hook(self._before, with_kwargs=True),
                         decoder.register_forward_hook(self._after, with_kwargs=True)]

    def unwrap(self) -> None:
        """None: the caller deletes this added attribute; the decoder hooks go with it."""
        for handle in self._handles:
            handle.remove()

    def running(self) -> nn.Module | None:
        if self.disabled or not self.active:
            return None
        if len(self.active) > 1:
            raise AdapterError(f"{self.kind} adapters {list(self.active)} are active together; "
                               "only one prompt-learning adapter can run at a time")
        name, weight = next(iter(self.active.items()))
        if weight != 1.0:
            raise AdapterError(f"{self.kind} adapter '{name}' is active with weight {weight}; "
                               "virtual tokens cannot be weighted (use 1)")
        return self.adapters[name]

    def _before(self, decoder, args, kwargs):
        self._strip = 0
        adapter = self.running()
        if adapter is None:
            return None
        kwargs = {**dict(zip(self._names, args)), **kwargs}
        for old in CACHE_KEYWORDS:  # a caller may still use the other name: pass it on as ours
            if old != self.cache_key and old in kwargs:
                kwargs[self.cache_key] = kwargs.pop(old)
        past = cache_length(kwargs.get(self.cache_key))
        mask, n = kwargs.get("attention_mask"), adapter.config.num_virtual_tokens
        if mask is not None:
            if mask.dim() != 2:
                raise AdapterError(f"{self.kind} tuning needs a 2D attention_mask, got shape "
                                   f"{tuple(mask.shape)}")
            kwargs["attention_mask"] = mask = torch.cat([mask.new_ones(len(mask), n), mask], 1)
        kwargs = self.inject(decoder, adapter, kwargs, past)
        inputs = kwargs.get("inputs_embeds")
        inputs = inputs if inputs is not None else kwargs["input_ids"]
        expected = cache_length(kwargs.get(self.cache_key)) + inputs.shape[1]
        if mask is not None and mask.shape[1] != expected:
            raise AdapterError(f"attention_mask covers {mask.shape[1]} positions with the virtual "
                               f"tokens, cache plus input hold {expected}: the cache was filled "
                               "without this adapter (switch adapters only between sequences)")
        return (), kwargs

    def inject(self, decoder, adapter, kwargs: dict, past: int) -> dict:
        """Prepend the virtual embeddings when the sequence starts; shift positions after them."""
        n, pos = adapter.config.num_virtual_tokens, kwargs.get("position_ids")
        if past:  # decode step: the virtual tokens are in the cache
            if pos is not None:
                kwargs["position_ids"] = pos + n
            return kwargs
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = decoder.get_input_embeddings()(kwargs["input_ids"])
        prompts = adapter.embedding.weight.to(embeds.dtype).expand(len(embeds), -1, -1)
        kwargs["inputs_embeds"], kwargs["input_ids"] = torch.cat([prompts, embeds], 1), None
        if pos is not None:
            # generate's positions skip left padding; the virtual tokens take 0..n-1 right
            # before the first real token, so a padded row sees what it saw in training
            virtual = torch.arange(n, device=pos.device, dtype=pos.dtype)
            kwargs["position_ids"] = torch.cat([virtual.expand(*pos.shape[:-1], n), pos + n], -1)
        self._strip = n
        return kwargs

    def _after(self, decoder, args, kwargs, output):
        n, self._strip = self._strip, 0
        if not n:
            return None
        output.last_hidden_state = output.last_hidden_state[:, n:]
        if getattr(output, "hidden_states", None) is not None:
            output.hidden_states = tuple(h[:, n:] for h in output.hidden_states)
        return output

    def file_tensors(self, name: str, path: str) -> dict[str, torch.Tensor]:
        # PEFT's one unprefixed key: a file holds a single prompt-learning adapter.
        return {"prompt_embeddings": self.adapters[name].embedding.weight}


def place_host(model: nn.Module, attr: str, cls: type, name: str, adapter: nn.Module) -> None:
    """Put `adapter` as `name` (active) in the host at `model.<attr>`, created (with its
    decoder hooks) on first use."""
    host = getattr(model, attr, None)
    if host is None:
        host = cls(find_decoder(model))
        model.add_module(attr, host)
    elif type(host) is not cls:
        raise AdapterError(f"{type(model).__name__} already has an attribute '{attr}' "
                           f"({type(host).__name__}); cannot place the {cls.kind} host there")
    if name in host.adapters:
        raise AdapterError(f"{attr} already holds an adapter named '{name}'")
    host.adapters[name] = adapter
    host.active = {name: 1.0}


class PromptEmbedding(nn.Module):
    """`embedding.weight` [num_virtual_tokens, hidden]; PEFT's RANDOM init, N(0, 1)."""

    def __init__(self, config: PromptConfig, hidden: int, **placement):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.num_virtual_tokens, hidden, **placement)


def text_init_ids(config: PromptConfig, tokenizer) -> list[int]:
    """Token ids of prompt_tuning_init_text, repeated then cut to num_virtual_tokens (as PEFT)."""
    if tokenizer is None:
        raise AdapterError("prompt_tuning_init: text needs the tokenizer (pass tokenizer=)")
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise AdapterError(f"prompt_tuning_init_text {config.prompt_tuning_init_text!r} is empty")
    return (ids * math.ceil(config.num_virtual_tokens / len(ids)))[:config.num_virtual_tokens]


def attach_prompt(model: nn.Module, config: PromptConfig, name: str, tokenizer=None) -> None:
    """Add prompt adapter `name` at `model.prompt_encoder`; it becomes the active one there."""
    emb = find_decoder(model).get_input_embeddings()
    weight = emb.weight  # the adapter lives beside the embeddings, in fp32 or their dtype
    adapter = PromptEmbedding(config, weight.shape[1], device=weight.device,
                              dtype=adapter_dtype(config, weight.dtype))
    if config.prompt_tuning_init == "text":
        ids = torch.tensor(text_init_ids(config, tokenizer), device=weight.device)
        with torch.no_grad():
            adapter.embedding.weight.copy_(emb(ids))
    place_host(model, "prompt_encoder", PromptHost, name, adapter)


def peft_config(model: nn.Module, config: PromptConfig) -> dict:
    """adapter_config.json as PEFT writes it for PROMPT_TUNING. Init is always RANDOM: the values
    come from the file, and PEFT refuses TEXT without a loadable tokenizer path."""
    cfg = model.config.get_text_config()
    return {**PEFT_COMMON, "peft_type": "PROMPT_TUNING", "token_dim": cfg.hidden_size,
            "num_virtual_tokens": config.num_virtual_tokens, "num_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads, "prompt_tuning_init": "RANDOM",
            "prompt_tuning_init_text": config.prompt_tuning_init_text,
            "tokenizer_name_or_path": None, "tokenizer_kwargs": None}


def loaded_options(values: dict) -> dict:
    """The trained embeddings come from the file; the init text only mattered before training."""
    values = {**values, "prompt_tuning_init": "random"}
    values.pop("prompt_tuning_init_text", None)
    return values


# Samples packed into one row cannot share the virtual tokens in front of it (prefix tuning too).
NO_PACKING = "virtual tokens lead each row"

# Serving: the virtual tokens of one adapter lead its rows; two adapters' cannot be summed.
NO_LEAD_COMPOSITION = ("virtual tokens go in front of a row's prompt; two adapters' tokens "
                       "cannot be added or weighted")


def prompt_lead(adapter: PeftFolder, model: nn.Module) -> RowLead:
    """The file's virtual token embeddings, checked against the served model's embeddings."""
    table = adapter.tensors.get("prompt_embeddings")
    want = (adapter.config.num_virtual_tokens, find_decoder(model).get_input_embeddings()
            .weight.shape[1])
    if table is None or tuple(table.shape) != want:
        got = "no prompt_embeddings" if table is None else f"shape {tuple(table.shape)}"
        raise AdapterError(f"{adapter.weights_path}: prompt_embeddings has {got}; this model "
                           f"needs {want} (num_virtual_tokens, hidden size)")
    return RowLead(embeds=table.float())


register(MethodRecord(
    name="prompt", config_class=PromptConfig, peft_type="PROMPT_TUNING",
    files=FileSpec(("prompt_embeddings",),
                   peft_fields=lambda model, name, config, compact: peft_config(model, config),
                   loaded_options=loaded_options),
    attach=attach_prompt,
    training=TrainingSpec(why_no_packing=NO_PACKING,
                          virtual_tokens=lambda config: config.num_virtual_tokens),
    merge=MergeSpec(why_not="prompt tuning adds virtual tokens, not weights: there is nothing "
                            "to fold in"),
    serving=ServingSpec(lead=prompt_lead, why_no_composition=NO_LEAD_COMPOSITION)))
