"""The transformers config of a GGUF file, with the settings transformers' GGUF reader drops put
back from the file's own metadata, or the load refused by name.

transformers' reader maps a fixed table of GGUF keys per architecture; for several families it
ignores keys that change the model's output (head_dim, Gemma's query scale and softcapping,
Phi-3's longrope factors and partial rotary), so the loaded model would run silently wrong.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


class GGUFLoadError(ValueError):
    """A GGUF file whose settings transformers cannot represent exactly."""


def _refuse(path: Path, arch: str, key: str, why: str) -> GGUFLoadError:
    return GGUFLoadError(
        f"{path}: {key} ({arch}): {why}; transformers would load this model silently wrong. "
        "Load the model's Hugging Face folder (config.json + safetensors) instead.")


def _fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items()}


def _vector(reader, name: str) -> list[float] | None:
    for t in reader.tensors:
        if t.name == name:
            return np.asarray(t.data, dtype=np.float64).reshape(-1).tolist()
    return None


def gguf_config(path: Path):
    """transformers' config for GGUF `path`, completed from its metadata (exact), or
    GGUFLoadError naming the key and the family when it cannot be made exact."""
    from gguf import GGUFReader
    from transformers import AutoConfig

    path = Path(path)
    reader = GGUFReader(str(path))
    meta = _fields(reader)
    arch = meta.get("general.architecture")
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)

    def get(key: str, default=None):
        return meta.get(f"{arch}.{key}", default)

    heads = get("attention.head_count")
    hidden = get("embedding_length")
    head_dim = get("attention.key_length") or (hidden // heads if hidden and heads else None)
    if get("attention.value_length", head_dim) != head_dim:
        raise _refuse(path, arch, f"{arch}.attention.value_length", "differs from key_length")
    if head_dim and getattr(config, "head_dim", head_dim) != head_dim:
        # Qwen3 (and any family whose reader skips key_length): the default would not fit
        # the stored Q/K/V shapes.
        config.head_dim = head_dim
    rotary = get("rope.dimension_count")
    freqs = _vector(reader, "rope_freqs.weight")
    if freqs is not None:
        _llama3(path, arch, config, freqs, get("rope.freq_base"), rotary or head_dim)
    scaling = get("rope.scaling.type")
    if scaling not in (None, "none") and arch != "phi3":
        raise _refuse(path, arch, f"{arch}.rope.scaling.type={scaling}",
                      "transformers' GGUF reader does not read rope scaling for this family")
    if arch in ("gemma2", "gemma3"):
        _gemma(path, arch, config, get, head_dim)
    elif arch == "phi3":
        _phi3(path, reader, config, get, head_dim, rotary)
    elif rotary and head_dim and rotary != head_dim:
        raise _refuse(path, arch, f"{arch}.rope.dimension_count",
                      f"partial rotary ({rotary} of {head_dim}) is not read for this family")
    return config


def _llama3(path, arch, config, factors, theta, dim) -> None:
    """Llama 3.x rope scaling, stored as one divisor per frequency (rope_freqs), as the llama3
    rope parameters that give the same frequencies.

    The divisors determine the parameters only together with Meta's low/high frequency
    factors (1 and 4, in every published Llama 3.x). With those fixed, `factor` is the largest
    divisor (or, when the lowest frequency is still smoothed, follows from the smoothed ones)
    and each smoothed divisor gives original_max_position_embeddings; when none is smoothed, any
    original length between the last unscaled and first scaled wavelength gives the same
    frequencies. transformers' own llama3 frequencies are computed from the parameters chosen
    and must equal the file's; otherwise the load is refused."""
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    key = "rope_freqs (llama3 rope scaling)"
    f = np.asarray(factors, dtype=np.float64)
    default = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim)
    if len(f) != len(default):
        raise _refuse(path, arch, key, f"{len(f)} divisors for {len(default)} frequencies")
    if np.all(f == 1.0):
        return  # no scaling: the default frequencies
    wavelen = 2 * math.pi / default
    want = torch.from_numpy(default / f.astype(np.float32)).float()
    low, high = 1.0, 4.0
    unscaled = np.isclose(f, 1.0, rtol=1e-6)
    candidates = [f.max()]
    if (~unscaled).sum() >= 2:
        # all smoothed: 1/f = u + (original/wavelen - low)(1 - u)/(high - low), u = 1/factor,
        # a line in 1/wavelen whose intercept gives u
        _, intercept = np.polyfit(1 / wavelen[~unscaled], 1 / f[~unscaled], 1)
        k = low / (high - low)
        candidates.append((1 + k) / (intercept + k))
    for factor in candidates:
        factor = float(f"{factor:.6g}")  # float32 in the file: 8.000001 is 8
        middle = ~(unscaled | np.isclose(f, factor, rtol=1e-6))
        if middle.any():  # 1/f = (1 - s)/factor + s, s = (original/wavelen - low)/(high - low)
            s = (1 / f[middle] - 1 / factor) / (1 - 1 / factor)
            original = float(round(np.median((s * (high - low) + low) * wavelen[middle])))
        elif unscaled.any():  # unscaled below original/high, scaled above original/low
            last, first = wavelen[unscaled].max(), wavelen[~unscaled].min()
            original = float(math.floor(math.sqrt(last * high * first * low)))
        else:
            continue
        config.rope_parameters = dict(
            config.rope_parameters or {}, rope_type="llama3", rope_theta=theta, factor=factor,
            low_freq_factor=low, high_freq_factor=high,
            original_max_position_embeddings=original)
        got, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
        if torch.allclose(got.float(), want, rtol=1e-5, atol=0):
            return
    raise _refuse(path, arch, key, "the divisors are not those of llama3 rope parameters "
                  "with low_freq_factor 1 and high_freq_factor 4")


def _gemma(path, arch, config, get, head_dim) -> None:
    layers = get("block_count")
    if (arch, layers) in (("gemma2", 46), ("gemma3", 62)):
        # llama.cpp scales queries by hidden/heads for the 27B models only, chosen by layer
        # count; we do not guess a size-dependent rule.
        raise _refuse(path, arch, f"{arch}.block_count={layers}",
                      "the query scale of the 27B model is not stored in the file")
    # llama.cpp scales queries by 1/sqrt(key_length): the query_pre_attn_scalar it implies
    config.query_pre_attn_scalar = head_dim
    pattern = get("attention.sliding_window_pattern")
    if pattern is not None:  # which layers attend locally (the reader keeps the default mix)
        config.layer_types = ["sliding_attention" if p else "full_attention" for p in pattern]
    local_theta = get("rope.freq_base_swa")
    rope = config.rope_parameters
    if local_theta is not None and isinstance(rope, dict) and "sliding_attention" in rope:
        rope["sliding_attention"] = dict(rope["sliding_attention"], rope_theta=local_theta)
    if arch == "gemma2":  # not in transformers' gemma2 key table: its defaults would stay
        config.attn_logit_softcapping = get("attn_logit_softcapping")
        config.final_logit_softcapping = get("final_logit_softcapping")
    elif get("final_logit_softcapping") is not None:
        raise _refuse(path, arch, f"{arch}.final_logit_softcapping", "not read for gemma3")


def _phi3(path, reader, config, get, head_dim, rotary) -> None:
    rope = dict(config.rope_parameters)
    if rotary and head_dim and rotary != head_dim:  # Phi-4-mini: 0.75 of the head
        rope["partial_rotary_factor"] = rotary / head_dim
        config.partial_rotary_factor = rotary / head_dim
    long, short = (_vector(reader, f"rope_factors_{k}.weight") for k in ("long", "short"))
    if long is not None or short is not None:
        if long is None or short is None:
            raise _refuse(path, "phi3", "rope_factors_long/short", "only one of them is stored")
        original = get("rope.scaling.original_context_length")
        if original is None:
            raise _refuse(path, "phi3", "phi3.rope.scaling.original_context_length", "missing")
        context = config.max_position_embeddings
        # transformers derives the attention factor from the context lengths; refuse a file
        # whose stored factor is another one.
        want = (math.sqrt(1 + math.log(context / original) / math.log(original))
                if context > original else 1.0)
        stored = get("rope.scaling.attn_factor", want)
        if not math.isclose(stored, want, rel_tol=1e-6):
            raise _refuse(path, "phi3", "phi3.rope.scaling.attn_factor",
                          f"{stored} is not the {want} transformers derives")
        # float32 in the file: round-trip through float32 so the values are the stored ones
        rope.update(rope_type="longrope", long_factor=[float(np.float32(x)) for x in long],
                    short_factor=[float(np.float32(x)) for x in short])
        config.original_max_position_embeddings = original
    config.rope_parameters = rope
