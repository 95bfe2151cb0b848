"""YaRN as llama.cpp computes it, for a model whose config asks otherwise (GPT-OSS).

Every released GPT-OSS config says `truncate: false`: transformers (and now vLLM and SGLang)
ramp YaRN's interpolation between fractional correction dimensions, while llama.cpp's
`ggml_rope_yarn_corr_dims` rounds them to whole dimensions (floor / ceil). The export refuses
such a model unless the user accepts llama.cpp's rounding (`export gguf --round-yarn`); then the
file is written for the model with `truncate: true`, which is what llama.cpp runs and what our
GGUF reader reads back, and `rounded_yarn` says how far the two models' rotations drift apart.
"""

from __future__ import annotations

import copy

import torch

# where config.json keeps the RoPE parameters: transformers 5's name, then the older one
_ROPE_FIELDS = ("rope_parameters", "rope_scaling")


def _unrounded(config: dict) -> list[dict]:
    """The YaRN parameter dicts of `config` (per layer type too) that say truncate: false."""
    found = []
    for field in _ROPE_FIELDS:
        rope = config.get(field)
        if not isinstance(rope, dict):
            continue
        for params in [rope, *(v for v in rope.values() if isinstance(v, dict))]:
            if params.get("rope_type", params.get("type")) == "yarn" and \
                    params.get("truncate") is False:
                found.append(params)
    return found


def rounded_yarn(config: dict) -> tuple[dict, str | None]:
    """config.json as llama.cpp will run it (YaRN's truncate set true) and one line saying
    what that changes; `(config, None)` when the config has no unrounded YaRN."""
    from loratune.export.gguf_arch import hf_config

    if not _unrounded(config):
        return config, None
    exact = _inv_freq(hf_config(config))
    rounded = copy.deepcopy(config)
    for params in _unrounded(rounded):
        params["truncate"] = True
    drift = (_inv_freq(hf_config(rounded)) - exact).abs()
    changed = int((drift > 0).sum())
    line = (f"--round-yarn: rope truncate false -> true, as llama.cpp computes YaRN: {changed} of "
            f"{drift.numel()} rotary frequencies change")
    if changed:
        line += (f" (up to {(drift / exact).max().item():.0%}); their angles drift apart by "
                 f"{drift.max().item():.2e} rad per position, 1 rad by position "
                 f"{int(1 / drift.max().item())}")
    return rounded, line


def _inv_freq(hf) -> torch.Tensor:
    """The rotary inverse frequencies transformers computes for this config (full attention)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = hf.rope_parameters
    layer_type = "full_attention" if "full_attention" in rope else None
    kind = (rope[layer_type] if layer_type else rope)["rope_type"]
    kw = {"layer_type": layer_type} if layer_type else {}
    inv_freq, _ = ROPE_INIT_FUNCTIONS[kind](hf, torch.device("cpu"), **kw)
    return inv_freq.double()
