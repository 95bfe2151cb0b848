"""GGUF export of Llama-family models for llama.cpp, with the `gguf` package as the writer.

Tensor names and layouts are llama.cpp's: `token_embd`, `blk.N.attn_q` …, `output_norm`,
`output`; Q and K rows are permuted from Hugging Face's rotate-half RoPE order to the
interleaved pairs llama.cpp rotates. The tokenizer comes from the model's source GGUF when
there is one (the embedded model), else from tokenizer.json (BPE).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from loratune.export.kquants import QK_K, quantize_q4_k, quantize_q6_k
from loratune.files import check_output_path, publish_file, temp_file_for
from loratune.readers import check_safetensors, open_safetensors

SUPPORTED = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama"}
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_k_m")
NAMES = {  # HF module path (after `model.layers.N.`) -> llama.cpp tensor name
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


class GGUFExportError(ValueError):
    pass


def gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf_name)
    if m and m.group(2) in NAMES:
        return f"blk.{m.group(1)}.{NAMES[m.group(2)]}.{m.group(3)}"
    raise GGUFExportError(f"tensor {hf_name} has no llama.cpp name (unsupported layout)")


def rope_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of each head from [first halves | second halves] to interleaved pairs."""
    rows = w.shape[0]
    return (w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2)
            .reshape(w.shape))


def _q4_k_m_type(name: str, n_layers: int) -> str:
    """llama.cpp's Q4_K_M mix: 6-bit for the output layer and for attn_v / ffn_down in the
    first and last eighth of the layers and every third layer between; 4-bit elsewhere."""
    if name == "output.weight":
        return "q6_k"
    m = re.match(r"blk\.(\d+)\.(attn_v|ffn_down)\.", name)
    if m:
        i, eighth = int(m.group(1)), n_layers // 8
        if i < eighth or i >= 7 * n_layers // 8 or (i - eighth) % 3 == 2:
            return "q6_k"
    return "q4_k"


def _encode(t: torch.Tensor, kind: str):
    """(array, raw GGML type or None) for one 2-D weight; k-quants fall back as llama.cpp does
    when a row is not a multiple of 256 (Q4_K → Q5_0, Q6_K → Q8_0)."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    x = t.float().numpy()
    if kind in ("q4_k", "q6_k") and x.shape[-1] % QK_K:
        kind = "q5_0" if kind == "q4_k" else "q8_0"
    if kind == "f32":
        return x, None
    if kind == "f16":
        return x.astype(np.float16), None
    if kind == "q4_k":
        return quantize_q4_k(x), Q.Q4_K
    if kind == "q6_k":
        return quantize_q6_k(x), Q.Q6_K
    qtype = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q5_0": Q.Q5_0}[kind]
    if x.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return x.astype(np.float16), None  # too narrow to quantize: keep it in f16
    return gguf.quants.quantize(x, qtype), qtype


def tensor_kind(name: str, out_type: str, n_layers: int, ndim: int) -> str:
    if ndim == 1 or out_type == "f32":
        return "f32"  # norms and biases stay in full precision, as llama.cpp keeps them
    if out_type == "q4_k_m":
        return _q4_k_m_type(name, n_layers)
    if out_type == "q4_0" and name == "output.weight":
        # As llama.cpp's Q4_0 files: the output layer (token_embd when tied) at 6 bits, or
        # Q8_0 when its rows are not a multiple of 256; it costs little and the logits need it.
        return "q6_k"
    return out_type


FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "q4_k_m": 15}


def _metadata(writer, config: dict, name: str, out_type: str) -> None:
    heads = config["num_attention_heads"]
    hidden = config["hidden_size"]
    writer.add_name(name)
    writer.add_context_length(config.get("max_position_embeddings", 4096))
    writer.add_embedding_length(hidden)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_dimension_count(config.get("head_dim") or hidden // heads)
    # transformers 5 keeps RoPE settings in rope_parameters; older configs at the top level.
    rope = config.get("rope_parameters") or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(FILE_TYPES[out_type])
    scaling = config.get("rope_scaling") or rope
    if scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise GGUFExportError(f"rope_scaling {scaling} is not supported by this exporter yet")


def _target(out: Path, overwrite: bool, inputs: list) -> tuple[Path, Path]:
    """(final path, temp sibling) for a GGUF written under a temp name, then renamed."""
    out = Path(out)
    check_output_path(out, inputs)
    return out, temp_file_for(out, overwrite)


def _finish(writer, tmp: Path, out: Path) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    publish_file(tmp, out)


def write_gguf(folder: Path, out: Path, out_type: str = "f16", tokenizer_source: Path | None = None,
               tokenizer_pre: str | None = None, overwrite: bool = False) -> Path:
    """Write the model in safetensors `folder` as one GGUF file (temp name, then rename)."""
    import gguf

    from loratune.export.gguf_tokenizer import add_tokenizer

    if out_type not in TYPES:
        raise GGUFExportError(f"--type {out_type!r}: choose one of {', '.join(TYPES)}")
    config = json.loads((folder / "config.json").read_text())
    arch = (config.get("architectures") or [MODEL_TYPES.get(config.get("model_type"),
                                                            config.get("model_type"))])[0]
    if arch not in SUPPORTED:
        raise GGUFExportError(f"{folder}: architecture {arch} is not supported for GGUF export; "
                              f"supported: {', '.join(SUPPORTED)}")
    out, tmp = _target(out, overwrite, [folder, tokenizer_source])
    writer = gguf.GGUFWriter(str(tmp), SUPPORTED[arch])
    _metadata(writer, config, folder.name, out_type)
    add_tokenizer(writer, folder, tokenizer_source, tokenizer_pre)
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or \
        config["num_attention_heads"]
    n_layers = config["num_hidden_layers"]
    names = {k for shard in folder.glob("*.safetensors") for k in check_safetensors(shard)}
    # Tied embeddings: llama.cpp reads token_embd for both ends and wants no output tensor.
    # A checkpoint may hold the shared matrix under either name (safetensors keeps only one).
    tied = bool(config.get("tie_word_embeddings", False))
    try:
        for shard in sorted(folder.glob("*.safetensors")):
            with open_safetensors(shard) as f:
                for hf in f.keys():
                    if tied and hf == "lm_head.weight":
                        if "model.embed_tokens.weight" in names:
                            continue
                        hf_as = "model.embed_tokens.weight"
                    else:
                        hf_as = hf
                    t = f.get_tensor(hf)
                    if re.search(r"q_proj\.(weight|bias)$", hf):
                        t = rope_permute(t, heads)
                    elif re.search(r"k_proj\.(weight|bias)$", hf):
                        t = rope_permute(t, kv)
                    name = gguf_name(hf_as)
                    kind_name = "output.weight" if tied and name == "token_embd.weight" else name
                    array, raw = _encode(t, tensor_kind(kind_name, out_type, n_layers, t.dim()))
                    writer.add_tensor(name, array, raw_dtype=raw)
        _finish(writer, tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def write_lora_gguf(adapter_dir: Path, base_folder: Path, out: Path, out_type: str = "f32",
                    overwrite: bool = False) -> Path:
    """A LoRA adapter as llama.cpp's adapter GGUF (`llama-cli --lora FILE`): `<tensor>.lora_a`
    [r, in] and `.lora_b` [out, r] per layer, B's rows permuted like the base's Q/K rows."""
    import gguf

    from loratune.adapters.peft_format import (PeftFolder, lora_scale, read_adapter_config,
                                               read_adapter_weights)

    cfg, raw = read_adapter_config(adapter_dir)
    if cfg.method != "lora":
        raise GGUFExportError(f"{adapter_dir}: llama.cpp adapters are plain LoRA; a {cfg.method} "
                              "adapter must be merged instead (export gguf --adapter DIR)")
    config = json.loads((base_folder / "config.json").read_text())
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    adapter = PeftFolder(Path(adapter_dir), cfg, raw, read_adapter_weights(adapter_dir))
    # llama.cpp scales every layer by alpha / (that layer's rank); per-layer differences from
    # PEFT's scale (rank/alpha patterns, rsLoRA) are folded into B.
    alpha = lora_scale(cfg.lora_alpha, cfg.r, cfg.use_rslora) * cfg.r
    out, tmp = _target(out, overwrite, [adapter_dir, base_folder])
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(alpha))
    try:
        for path, (a, b) in adapter.lora_pairs().items():
            if b is None:
                raise GGUFExportError(f"{adapter_dir}: {path}.lora_A.weight has no matching "
                                      "lora_B tensor")
            a, b = a.float(), b.float()
            r = a.shape[0]
            b = b * (adapter.scale(path, r) * r / alpha)
            if path.endswith("q_proj"):
                b = rope_permute(b, heads)
            elif path.endswith("k_proj"):
                b = rope_permute(b, kv)
            name = gguf_name(f"{path}.weight")
            dtype = np.float16 if out_type == "f16" else np.float32
            writer.add_tensor(f"{name}.lora_a", a.numpy().astype(dtype))
            writer.add_tensor(f"{name}.lora_b", b.numpy().astype(dtype))
        _finish(writer, tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
