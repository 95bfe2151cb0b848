"""GPT-OSS as released: routed experts in MXFP4 (blocks + scales, quant_method mxfp4). Decoded
bit for bit as transformers decodes them; `export hf`, `merge` (an expert adapter too), `export
gguf` and QLoRA loading take such a folder, and give what transformers' own loading gives."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from loratune.models.mxfp4 import FP4_E2M1, dequantize_mxfp4

LONG = torch.arange(3, 103).unsqueeze(0)


def encode_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, out, in] -> MXFP4 blocks [E, out, in/32, 16] and scales [E, out, in/32] (nearest)."""
    lut = torch.tensor(FP4_E2M1)
    g = w.reshape(*w.shape[:-1], w.shape[-1] // 32, 32)
    e = torch.ceil(torch.log2(g.abs().amax(-1).clamp_min(1e-30) / 6.0)).clamp(-127, 127)
    idx = ((g / torch.exp2(e)[..., None])[..., None] - lut).abs().argmin(-1).to(torch.uint8)
    return idx[..., 0::2] | (idx[..., 1::2] << 4), (e + 127).to(torch.uint8)


@pytest.fixture(scope="module")
def mxfp4_folder(tmp_path_factory):
    """A tiny GPT-OSS saved with its experts in MXFP4, as openai/gpt-oss-* ship."""
    from tests.export.test_gguf_moe_more import gpt_oss

    folder = tmp_path_factory.mktemp("gpt-oss-mxfp4") / "m"
    model, tok = gpt_oss(hidden_size=64, intermediate_size=32)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    state = load_file(folder / "model.safetensors")
    for name in [k for k in state if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        state[name + "_blocks"], state[name + "_scales"] = encode_mxfp4(
            state.pop(name).transpose(1, 2).float())
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def transformers_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(LONG).logits


def test_decoded_bit_for_bit_as_transformers_decodes(mxfp4_folder):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    state = load_file(mxfp4_folder / "model.safetensors")
    name = "model.layers.1.mlp.experts.gate_up_proj"
    b, s = state[name + "_blocks"], state[name + "_scales"]
    got = dequantize_mxfp4(b, s)
    assert got.shape == (4, 64, 64) and got.abs().max() > 0
    assert torch.equal(got, convert_moe_packed_tensors(b, s))
    with pytest.raises(ValueError, match="expected uint8 blocks"):
        dequantize_mxfp4(b.float(), s)


def test_export_hf_writes_the_decoded_model(mxfp4_folder, tmp_path):
    from loratune.cli import main

    assert main(["export", "hf", "--model", str(mxfp4_folder), "--out", str(tmp_path / "hf")]) == 0
    assert "quantization_config" not in json.loads((tmp_path / "hf" / "config.json").read_text())
    torch.testing.assert_close(logits(transformers_model(tmp_path / "hf")),
                               logits(transformers_model(mxfp4_folder)), atol=0, rtol=0)


def test_export_gguf_from_the_mxfp4_folder_reads_back(mxfp4_folder, tmp_path):
    from loratune.cli import main
    from loratune.models import load_model

    out = tmp_path / "m.gguf"
    assert main(["export", "gguf", "--model", str(mxfp4_folder), "--out", str(out), "--type",
                 "f32", "--no-modelfile"]) == 0
    loaded, _ = load_model(str(out))
    torch.testing.assert_close(logits(loaded), logits(transformers_model(mxfp4_folder)),
                               atol=1e-4, rtol=0)


def test_merge_an_expert_adapter_into_the_mxfp4_base(mxfp4_folder, tmp_path):
    from loratune.adapters import add_adapter, save_adapter
    from loratune.config import LoraConfig
    from loratune.export.merge import merge_folder, read_adapters
    from tests.adapters.test_expert_lora import randomize

    model = transformers_model(mxfp4_folder)
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "experts"]))
    randomize(model)
    save_adapter(model, tmp_path / "a")
    # in float32: the decoded experts are bfloat16 (exact), W + delta is not
    merged = merge_folder(mxfp4_folder, read_adapters([tmp_path / "a"], None), tmp_path / "mg",
                          dtype="float32")
    assert merged.merged_modules > 0
    want = logits(model)
    assert (want - logits(transformers_model(mxfp4_folder))).abs().max() > 1e-3
    torch.testing.assert_close(logits(transformers_model(merged.out)), want, atol=1e-4, rtol=0)


def test_qlora_loads_the_mxfp4_experts_as_the_decoded_folder(mxfp4_folder, tmp_path):
    from loratune.config import ModelConfig, QuantConfig
    from loratune.export.merge import merge_folder
    from loratune.models import load_model
    from loratune.models.moe_experts import QuantizedExperts

    decoded = merge_folder(mxfp4_folder, [], tmp_path / "decoded").out
    nf4 = QuantConfig(type="nf4")
    got, _ = load_model(ModelConfig(name=str(mxfp4_folder), quantization=nf4))
    want, _ = load_model(ModelConfig(name=str(decoded), quantization=nf4))
    assert isinstance(got.model.layers[0].mlp.experts, QuantizedExperts)
    torch.testing.assert_close(logits(got), logits(want), atol=0, rtol=0)


def test_blocks_without_their_scales_are_refused_by_name(mxfp4_folder, tmp_path):
    import shutil

    from loratune.export.merge import merge_folder

    broken = tmp_path / "broken"
    shutil.copytree(mxfp4_folder, broken)
    state = load_file(broken / "model.safetensors")
    del state["model.layers.0.mlp.experts.down_proj_scales"]
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"down_proj_scales is missing"):
        merge_folder(broken, [], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _tampered(mxfp4_folder, tmp_path, change):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(mxfp4_folder, bad)
    state = load_file(bad / "model.safetensors")
    change(state, "model.layers.1.mlp.experts.gate_up_proj")
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    return bad


def _nan_scale(state, p):
    state[p + "_scales"][0, 0, 0] = 255  # E8M0's NaN


def _float_blocks(state, p):
    state[p + "_blocks"] = state[p + "_blocks"].float()


@pytest.mark.parametrize("change,why", [(_nan_scale, "decode to NaN or past float32"),
                                        (_float_blocks, "expected uint8 blocks")],
                         ids=["nan-scale", "float-blocks"])
def test_tampered_mxfp4_is_refused_naming_file_and_parameter(mxfp4_folder, tmp_path, change,
                                                             why):
    from loratune.config import ModelConfig, QuantConfig
    from loratune.export.merge import merge_folder
    from loratune.models import load_model

    bad = _tampered(mxfp4_folder, tmp_path, change)
    where = r"bad.*model.layers.1.mlp.experts.gate_up_proj: "
    with pytest.raises(ValueError, match=where + ".*" + why):
        merge_folder(bad, [], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=where + ".*" + why):
        load_model(ModelConfig(name=str(bad), quantization=QuantConfig(type="nf4")))


def test_other_prequantized_checkpoints_are_still_refused_by_the_merge(mxfp4_folder, tmp_path):
    import shutil

    from loratune.export.merge import merge_folder

    other = tmp_path / "bnb"
    shutil.copytree(mxfp4_folder, other)
    config = json.loads((other / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes"}
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"pre-quantized weights \(bitsandbytes\); merge from "
                                         r"the full-precision checkpoint"):
        merge_folder(other, [], tmp_path / "out")
