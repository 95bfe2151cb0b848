"""A GGUF's settings that transformers' GGUF reader drops are put back from the file's metadata
(values other than transformers' defaults), and the ones we cannot represent are refused by name."""

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from families import build_family, save_family  # noqa: E402
from loratune.export.gguf_file import write_gguf  # noqa: E402
from loratune.models import load_model  # noqa: E402
from loratune.models.gguf_config import GGUFLoadError, gguf_config  # noqa: E402


def rewrite(src, dst, changes: dict, tensors: dict | None = None):
    """Copy GGUF `src` to `dst` with metadata `changes` (key -> (value, GGUFValueType)) and
    `tensors` (name -> array) replaced."""
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in changes:
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub)
    for key, (value, vtype) in changes.items():
        writer.add_key_value(key, value, vtype)
    for t in reader.tensors:
        data = np.array(t.data, dtype=np.float32).reshape(list(reversed(t.shape.tolist())))
        writer.add_tensor(t.name, np.asarray((tensors or {}).get(t.name, data), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def edited_family(name, tmp_path, edit):
    folder = save_family(name, tmp_path / name)
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def same_logits(folder, path):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    loaded, _ = load_model(str(path))
    ids = torch.arange(5, 75).view(1, -1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)


def test_gemma2_softcapping_is_read(tmp_path):
    def edit(c):
        c.update(attn_logit_softcapping=3.0, final_logit_softcapping=2.0)
    folder = edited_family("gemma2", tmp_path, edit)
    path = write_gguf(folder, tmp_path / "g.gguf", "f32")
    assert gguf_config(path).final_logit_softcapping == pytest.approx(2.0)
    same_logits(folder, path)


def test_gemma3_layer_pattern_and_local_rope_theta_are_read(tmp_path):
    def edit(c):
        c["layer_types"] = ["full_attention", "sliding_attention"]
        c["rope_parameters"]["sliding_attention"]["rope_theta"] = 50.0
    folder = edited_family("gemma3", tmp_path, edit)
    path = write_gguf(folder, tmp_path / "g.gguf", "f32")
    config = gguf_config(path)
    assert config.layer_types == ["full_attention", "sliding_attention"]
    assert config.rope_parameters["sliding_attention"]["rope_theta"] == 50.0
    same_logits(folder, path)


def test_qwen3_head_dim_is_read(tmp_path, family_folder):
    path = write_gguf(family_folder("qwen3"), tmp_path / "q.gguf", "f32")
    assert gguf_config(path).head_dim == build_family("qwen3")[0].config.head_dim == 16


S, F, U = gguf.GGUFValueType.STRING, gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.UINT32


@pytest.mark.parametrize("name,changes,match", [
    ("qwen2_5", {"qwen2.rope.scaling.type": ("yarn", S)}, r"qwen2\.rope\.scaling\.type=yarn"),
    ("gemma2", {"gemma2.block_count": (46, U)}, r"gemma2\.block_count=46 \(gemma2\).*27B"),
    ("gemma3", {"gemma3.final_logit_softcapping": (30.0, F)},
     r"gemma3\.final_logit_softcapping \(gemma3\)"),
    ("qwen2_5", {"qwen2.rope.dimension_count": (4, U)}, r"partial rotary \(4 of 8\)"),
    ("phi3_5", {"phi3.rope.scaling.attn_factor": (1.5, F)}, r"phi3\.rope\.scaling\.attn_factor"),
    ("mistral_v0_3", {"llama.attention.value_length": (4, U)}, r"value_length"),
])
def test_unreadable_settings_are_refused_by_name(name, changes, match, tmp_path, family_folder):
    src = write_gguf(family_folder(name), tmp_path / "src.gguf", "f32")
    path = rewrite(src, tmp_path / "x.gguf", changes)
    with pytest.raises(GGUFLoadError, match=match + ".*Hugging Face folder"):
        load_model(str(path))
    rewrite(src, tmp_path / "same.gguf", {})  # the copy itself loads
    load_model(str(tmp_path / "same.gguf"))


def _llama3(original, high_freq_factor):
    def edit(c):  # theta 100, head_dim 8: wavelengths 6.3, 19.9, 62.8, 198.7
        c["rope_parameters"].update(original_max_position_embeddings=original, factor=8.0,
                                    rope_theta=100.0, low_freq_factor=1.0,
                                    high_freq_factor=high_freq_factor)
    return edit


def test_llama3_rope_scaling_is_read_back_from_rope_freqs(tmp_path):
    # 62.8 and 198.7 lie between 200/4 and 200: both smoothed
    folder = edited_family("llama3_1", tmp_path, _llama3(200, 4.0))
    path = write_gguf(folder, tmp_path / "l.gguf", "f32")
    rope = gguf_config(path).rope_parameters
    assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0
    assert rope["original_max_position_embeddings"] == 200  # recovered, not guessed
    same_logits(folder, path)


def test_llama3_divisors_of_other_parameters_are_refused(tmp_path, family_folder):
    src = write_gguf(family_folder("llama3_1"), tmp_path / "l.gguf", "f32")
    # not monotone in the wavelength: no llama3 parameters give these
    path = rewrite(src, tmp_path / "x.gguf", {}, {"rope_freqs.weight": [1.0, 3.0, 1.0, 8.0]})
    with pytest.raises(GGUFLoadError, match=r"rope_freqs \(llama3 rope scaling\) \(llama\): "
                       r"the divisors are not those of llama3 rope parameters.*Hugging Face"):
        load_model(str(path))


@pytest.mark.parametrize("factor", [8.0, 32.0])  # Llama 3.1 8B, Llama 3.2 1B/3B
def test_published_llama3_parameters_are_recovered(factor):
    """At the published shapes (head 128, theta 500000, original 8192), as llama.cpp stores
    them: the divisors transformers' own llama3 rope gives, in float32."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from loratune.models.gguf_config import _llama3

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": factor,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    published = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_parameters=rope,
                            max_position_embeddings=131072)
    inv, _ = ROPE_INIT_FUNCTIONS["llama3"](published, torch.device("cpu"))
    default = 1.0 / 500000.0 ** (torch.arange(0, 128, 2).float() / 128)
    divisors = (default / inv).float().tolist()
    assert 1 < sum(1.0 < d < factor * 0.999 for d in divisors)  # some are smoothed
    config = LlamaConfig(hidden_size=4096, num_attention_heads=32,
                         max_position_embeddings=131072)
    _llama3("x.gguf", "llama", config, divisors, 500000.0, 128)
    assert config.rope_parameters == rope
