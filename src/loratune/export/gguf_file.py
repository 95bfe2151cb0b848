"""GGUF export for llama.cpp, with the `gguf` package as the writer.

Every family in gguf_arch.FAMILIES (Llama 3.x, Mistral, Qwen2.5, Qwen3, Gemma 2/3, Phi-3,
Qwen3-MoE, Mixtral, OLMoE, GPT-OSS, DeepSeek-V2/V3): tensor names from gguf's own name map for
the architecture, weights transformed and metadata written as gguf_arch says, the tokenizer
copied from the model's source GGUF when there is one (the embedded models) or built from
tokenizer.json (gguf_tokenizer). Routed experts, one
matrix per expert in the checkpoint (or fused [E, 2I, H] / [E, H, I]), are written as llama.cpp
reads them: one [experts, out, in] tensor per projection (ffn_gate_exps, ffn_up_exps,
ffn_down_exps), under the names gguf's map gives the merged `experts.gate_proj` & co.;
GPT-OSS's [E, in, out] experts with gate/up interleaved by column are split and transposed
to the same, their biases beside; DeepSeek's kv_b_proj split per head into attn_k_b and
attn_v_b (llama.cpp's absorbed multi-head latent attention).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from loratune.data.new_tokens import new_tokens_of
from loratune.export.gguf_arch import (GGUFExportError, Family, family_of, gguf_arch_name,
                                       rope_permute, tensor_name_map, write_metadata)
from loratune.export.gguf_yarn import rounded_yarn
from loratune.export.kquants import QK_K, quantize_q4_k, quantize_q6_k
from loratune.files import check_output_path, publish_file, temp_file_for
from loratune.models.moe_experts import current_name, per_expert_key
from loratune.readers import check_safetensors, open_safetensors

__all__ = ["GGUFExportError", "rope_permute", "write_gguf", "write_lora_gguf", "TYPES"]

TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_k_m")


def gguf_name(names, hf_name: str, arch: str) -> str:
    """llama.cpp's name for an HF tensor, from gguf's map for the architecture."""
    name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise GGUFExportError(f"tensor {hf_name} has no name in llama.cpp's {arch} architecture "
                              "(unsupported layout)")
    return name


def _transform(family: Family, hf: str, t: torch.Tensor, config: dict) -> torch.Tensor:
    """An HF tensor as llama.cpp stores it (Q/K rows permuted, Gemma norms as 1 + w)."""
    if family.interleaved_rope:
        heads = config["num_attention_heads"]
        if re.search(r"q_proj\.(weight|bias)$", hf):
            return rope_permute(t, heads)
        if re.search(r"k_proj\.(weight|bias)$", hf):
            return rope_permute(t, config.get("num_key_value_heads") or heads)
    if family.norm_offset and hf.endswith("norm.weight"):
        return t.float() + family.norm_offset
    return t


def _q4_k_m_type(name: str, n_layers: int) -> str:
    """llama.cpp's Q4_K_M mix: 6-bit for the output layer and for attn_v / ffn_down in the
    first and last eighth of the layers and every third layer between (ffn_down_exps as
    ffn_down); 4-bit elsewhere."""
    if name == "output.weight":
        return "q6_k"
    m = re.match(r"blk\.(\d+)\.(attn_v|ffn_down|ffn_down_exps)\.", name)
    if m:
        i, eighth = int(m.group(1)), n_layers // 8
        if i < eighth or i >= 7 * n_layers // 8 or (i - eighth) % 3 == 2:
            return "q6_k"
    return "q4_k"


def _encode(t: torch.Tensor, kind: str):
    """(array, raw GGML type or None) for one weight, 2-D or stacked experts [E, out, in];
    k-quants fall back as llama.cpp does when a row is not a multiple of 256 (Q4_K → Q5_0,
    Q6_K → Q8_0)."""
    array, raw = _encode_rows(t.reshape(-1, t.shape[-1]) if t.dim() > 2 else t, kind)
    if t.dim() > 2:  # quantized bytes per row, back under the experts' leading dims
        array = array.reshape(*t.shape[:-1], array.shape[-1])
    return array, raw


def _encode_rows(t: torch.Tensor, kind: str):
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
    if ndim == 1 or out_type == "f32" or name.endswith(".bias"):
        # norms and biases (GPT-OSS's [experts, out] too) stay in full precision, as llama.cpp
        # keeps them
        return "f32"
    if out_type == "q4_k_m":
        return _q4_k_m_type(name, n_layers)
    if out_type == "q4_0" and name == "output.weight":
        # As llama.cpp's Q4_0 files: the output layer (token_embd when tied) at 6 bits, or
        # Q8_0 when its rows are not a multiple of 256; it costs little and the logits need it.
        return "q6_k"
    return out_type


FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "q4_k_m": 15}


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


def _weights(folder: Path, config: dict):
    """(HF name, tensor) of the model's weights; with tied embeddings the shared matrix once, as
    model.embed_tokens (a checkpoint may hold it under either name: safetensors keeps one)."""
    from loratune.models.load import weight_files

    files = weight_files(folder)
    if not files:
        raise GGUFExportError(f"{folder}: no model*.safetensors weights")
    names = {k for shard in files for k in check_safetensors(shard)}
    tied = bool(config.get("tie_word_embeddings", False))
    for shard in files:
        with open_safetensors(shard) as f:
            for hf in f.keys():
                if tied and hf == "lm_head.weight":
                    if "model.embed_tokens.weight" in names:
                        continue
                    yield "model.embed_tokens.weight", f.get_tensor(hf)
                else:
                    yield hf, f.get_tensor(hf)


def _gpt_oss_tensors(name: str, t: torch.Tensor):
    """GPT-OSS's experts ([E, in, out], gate and up alternating columns, biases beside) as
    llama.cpp's [E, out, in] gate / up / down and their [E, out] biases; the attention sinks
    as `attn_sinks.weight` (the name llama.cpp loads, as its converter writes it)."""
    if name.endswith(".self_attn.sinks"):
        yield name + ".weight", t
    elif name.endswith(".experts.gate_up_proj"):
        yield name.replace("gate_up_proj", "gate_proj.weight"), t[..., ::2].transpose(1, 2)
        yield name.replace("gate_up_proj", "up_proj.weight"), t[..., 1::2].transpose(1, 2)
    elif name.endswith(".experts.gate_up_proj_bias"):
        yield name.replace("gate_up_proj_bias", "gate_proj.bias"), t[..., ::2]
        yield name.replace("gate_up_proj_bias", "up_proj.bias"), t[..., 1::2]
    elif name.endswith(".experts.down_proj"):
        yield name + ".weight", t.transpose(1, 2)
    elif name.endswith(".experts.down_proj_bias"):
        yield name.replace("down_proj_bias", "down_proj.bias"), t
    else:
        yield name, t


def _mla_tensors(name: str, t: torch.Tensor, config: dict):
    """DeepSeek's kv_b_proj [heads·(nope + v), rank] as llama.cpp's deepseek2 reads it: per
    head, attn_k_b [heads, rank, nope] (transposed, absorbed into the query) and attn_v_b
    [heads, v, rank]; the selection bias under the name gguf maps (`e_score_correction.bias`)."""
    if name.endswith(".self_attn.kv_b_proj.weight"):
        nope = config["qk_nope_head_dim"]
        per_head = t.reshape(config["num_attention_heads"], -1, t.shape[-1])
        yield name.replace("kv_b_proj", "k_b_proj"), per_head[:, :nope].transpose(1, 2)
        yield name.replace("kv_b_proj", "v_b_proj"), per_head[:, nope:]
    elif name.endswith(".e_score_correction_bias"):
        yield name.replace("e_score_correction_bias", "e_score_correction.bias"), t
    else:
        yield name, t


def _stacked_experts(weights, n_experts: int | None, interleaved: bool = False):
    """The checkpoint's tensors with routed experts as llama.cpp stores them: one expert's
    matrices (`experts.<e>.gate_proj`, Mixtral's `w1`) gathered until every expert of the layer
    arrived, then yielded once as `<experts>.gate_proj` [E, out, in]; a fused `gate_up_proj`
    [E, 2I, H] split into its gate and up halves."""
    pending: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for hf, t in weights:
        key = per_expert_key(hf)
        name = current_name(hf)
        if interleaved:
            for pair in _gpt_oss_tensors(name, t):
                yield pair[0], pair[1].contiguous()
        elif key is not None:
            path, expert, part = key
            got = pending.setdefault((path, part), {})
            got[expert] = t
            if len(got) == n_experts:
                yield f"{path}.{part}.weight", torch.stack([got[e] for e in range(n_experts)])
                del pending[(path, part)]
        elif name.endswith(".experts.gate_up_proj") and t.dim() == 3:
            gate, up = t.chunk(2, dim=1)
            yield name.replace("gate_up_proj", "gate_proj.weight"), gate
            yield name.replace("gate_up_proj", "up_proj.weight"), up
        elif name.endswith(".experts.down_proj") and t.dim() == 3:
            yield name + ".weight", t
        else:
            yield hf, t
    if pending:
        (path, part), got = next(iter(pending.items()))
        raise GGUFExportError(f"{path}.{part}: the checkpoint holds experts {sorted(got)} of "
                              f"{n_experts} (num_experts in config.json)")


def _family_tensors(family: Family, config: dict, weights):
    for hf, t in weights:
        if family.mla:
            for name, x in _mla_tensors(hf, t, config):
                yield name, x.contiguous()
        else:
            yield hf, t


def _n_experts(config: dict) -> int | None:
    return (config.get("num_experts") or config.get("num_local_experts")
            or config.get("n_routed_experts"))


def write_gguf(folder: Path, out: Path, out_type: str = "f16", tokenizer_source: Path | None = None,
               tokenizer_pre: str | None = None, overwrite: bool = False,
               tokenizer_folder: Path | None = None, round_yarn: bool = False) -> Path:
    """Write the model in safetensors `folder` as one GGUF file (temp name, then rename); the
    tokenizer from `tokenizer_folder` where it is not `folder` (a VLM's language model);
    `round_yarn`: YaRN as llama.cpp computes it where config.json says otherwise (gguf_yarn)."""
    import gguf

    from loratune.export.gguf_tokenizer import add_tokenizer

    if out_type not in TYPES:
        raise GGUFExportError(f"--type {out_type!r}: choose one of {', '.join(TYPES)}")
    config = json.loads((folder / "config.json").read_text())
    if round_yarn:
        config, note = rounded_yarn(config)
        if note:
            print(note)
    _, family = family_of(config, str(folder / "config.json"))
    arch = gguf_arch_name(family)
    n_layers = config["num_hidden_layers"]
    names = tensor_name_map(family, n_layers)
    out, tmp = _target(out, overwrite, [folder, tokenizer_source])
    try:
        writer = gguf.GGUFWriter(str(tmp), arch)
        extra = write_metadata(writer, family, config, folder.name, FILE_TYPES[out_type])
        add_tokenizer(writer, tokenizer_folder or folder, config["vocab_size"], tokenizer_source,
                      tokenizer_pre)
        tied = bool(config.get("tie_word_embeddings", False))
        for hf, t in _family_tensors(family, config, _stacked_experts(
                _weights(folder, config), _n_experts(config), family.interleaved_experts)):
            name = gguf_name(names, hf, arch)
            t = _transform(family, hf, t, config)
            # the tied embedding is also the output layer: quantized as llama.cpp quantizes that
            kind_name = "output.weight" if tied and name == "token_embd.weight" else name
            array, raw = _encode(t, tensor_kind(kind_name, out_type, n_layers, t.dim()))
            writer.add_tensor(name, array, raw_dtype=raw)
        for name, t in extra.items():
            writer.add_tensor(name, t.float().numpy())
        _finish(writer, tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _expert_factors(adapter, interleaved: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{`<experts>.gate_proj` / `up_proj` / `down_proj`: (A [E, r, in], s·B [E, out, r])} of an
    adapter on fused experts: llama.cpp applies a 3-D pair on ffn_*_exps per routed expert
    (build_lora_mm_id: mul_mat_id with A, then B, scaled by alpha / B's ne[0], the rank).
    gate and up share the experts' A; their B are the two halves of gate_up_proj's rows, or
    its alternate rows where gate and up are `interleaved` (GPT-OSS)."""
    from loratune.export.merge_experts import experts_adapter

    out = {}
    for path, parts in adapter.expert_modules().items():
        ad = experts_adapter(adapter, path, parts)
        with torch.no_grad():
            a, b = (t.detach().float() for t in ad.factors("gate_up_proj"))
            b = b * ad.scaling
            gate, up = (b[:, 0::2], b[:, 1::2]) if interleaved else b.chunk(2, dim=1)
            out[f"{path}.gate_proj"], out[f"{path}.up_proj"] = (a, gate), (a, up)
            a, b = (t.detach().float() for t in ad.factors("down_proj"))
            out[f"{path}.down_proj"] = (a, b * ad.scaling)
    return out


def _refuse_unapplied(family: Family, factors: dict, adapter_dir: Path, arch: str) -> None:
    for path in factors:
        leaf = path.removesuffix(".base_layer").rsplit(".", 1)[-1]
        if leaf in family.no_lora:
            raise GGUFExportError(f"{adapter_dir}: the adapter holds {path}, which llama.cpp's "
                                  f"{arch} multiplies without applying adapters; merge it "
                                  "instead (export gguf --adapter DIR)")


def write_lora_gguf(adapter_dir: Path, base_folder: Path, out: Path, out_type: str = "f32",
                    overwrite: bool = False) -> Path:
    """A LoRA adapter as llama.cpp's adapter GGUF (`llama-cli --lora FILE`): `<tensor>.lora_a`
    [r, in] and `.lora_b` [out, r] per layer, [experts, r, in] / [experts, out, r] per routed
    experts' projection (ffn_gate_exps, ffn_up_exps, ffn_down_exps), under the base's
    architecture (llama.cpp refuses an adapter of another one), B's rows permuted like the
    base's Q/K rows where it permutes."""
    import gguf

    from loratune.adapters import method_record
    from loratune.adapters.peft_format import (lora_scale, read_adapter_config,
                                               read_peft_weights)

    cfg, raw = read_adapter_config(adapter_dir)
    export = method_record(cfg.method).export
    if export.gguf_factors is None:
        raise GGUFExportError(f"{adapter_dir}: a {cfg.method} adapter cannot be written as "
                              f"llama.cpp's adapter file ({export.why_not}); merge it instead "
                              "(export gguf --adapter DIR)")
    # The one reader that checks the config's ranks against the tensors' shapes.
    adapter = read_peft_weights(Path(adapter_dir), cfg, raw)
    grown = new_tokens_of(adapter_dir)
    if grown:
        added = ", ".join(grown["tokens"])
        raise GGUFExportError(f"{adapter_dir}: the adapter adds tokens ({added}), which "
                              "llama.cpp's adapter file cannot carry (it holds no "
                              "vocabulary); merge it instead (export gguf --adapter DIR): the "
                              "merged GGUF has the grown embeddings and the adapter's tokenizer")
    config = json.loads((base_folder / "config.json").read_text())
    _, family = family_of(config, str(base_folder / "config.json"))
    arch = gguf_arch_name(family)
    names = tensor_name_map(family, config["num_hidden_layers"])
    experts = adapter.expert_modules()  # their 2-D view in the file is not llama.cpp's pair
    factors = {path: f for path, f in export.gguf_factors(adapter).items()
               if path.removesuffix(".base_layer") not in experts}
    factors.update(_expert_factors(adapter, family.interleaved_experts))
    _refuse_unapplied(family, factors, adapter_dir, arch)
    # llama.cpp scales every layer by alpha / (that layer's rank): the factors carry PEFT's
    # per-layer scale in B (rank/alpha patterns, rsLoRA), so r / alpha undoes llama.cpp's.
    alpha = lora_scale(cfg.lora_alpha, cfg.r, cfg.use_rslora) * cfg.r
    dtype = np.float16 if out_type == "f16" else np.float32
    out, tmp = _target(out, overwrite, [adapter_dir, base_folder])
    try:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_string("general.type", "adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", float(alpha))
        for path, (a, b) in factors.items():
            b = _transform(family, f"{path}.weight", b * (a.shape[-2] / alpha), config)
            name = gguf_name(names, f"{path}.weight", arch)
            writer.add_tensor(f"{name}.lora_a", a.numpy().astype(dtype))
            writer.add_tensor(f"{name}.lora_b", b.numpy().astype(dtype))
        _finish(writer, tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
