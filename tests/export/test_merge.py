"""loratune merge / export hf: streamed merge equals the live adapters; files; bad input."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from loratune.adapters import add_adapter, save_adapter, set_active
from loratune.adapters.inject import AdapterError, adapted_layers
from loratune.cli import main
from loratune.config import IA3Config, LoraConfig, MoeLoraConfig
from loratune.export.merge import merge_folder, parse_size, read_adapters
from tiny import tiny_llama

IDS = torch.tensor([[3, 7, 11, 2, 64, 99, 5]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture
def base_dir(tmp_path):
    model = tiny_llama(bias=True)
    model.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def _adapter(base_dir, tmp_path, config, name, seed):
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    add_adapter(model, config, name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            for ad in layer.adapters.values():
                for t in ad.file_tensors().values():
                    t.add_(0.2 * torch.randn(t.shape, generator=g))
    return save_adapter(model, tmp_path / name, name)


def _live(base_dir, folders, weights):
    from loratune.adapters import load_adapter

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    for i, f in enumerate(folders):
        load_adapter(model, f, f"a{i}")
    set_active(model, {f"a{i}": w for i, w in enumerate(weights)})
    return logits(model)


@pytest.mark.parametrize("config", [
    LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", bias="lora_only"),
    LoraConfig(method="dora", r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]),
    IA3Config(),
], ids=["lora", "dora", "ia3"])
def test_merged_folder_loads_in_plain_transformers_with_equal_logits(base_dir, tmp_path, config):
    folder = _adapter(base_dir, tmp_path, config, "ad", seed=1)
    expected = _live(base_dir, [folder], [1.0])
    report = merge_folder(base_dir, read_adapters([folder], None), tmp_path / "out")
    assert report.merged_modules > 0
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert not list(adapted_layers(plain))
    torch.testing.assert_close(logits(plain), expected, atol=1e-4, rtol=0)
    assert not list((tmp_path / "out").glob("*.bin"))


def test_weighted_combination_sharded_and_cli(base_dir, tmp_path, capsys):
    a = _adapter(base_dir, tmp_path, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), "x", 1)
    b = _adapter(base_dir, tmp_path, IA3Config(), "y", 2)
    expected = _live(base_dir, [a, b], [0.7, 0.3])
    code = main(["merge", "--model", str(base_dir), "--adapter", str(a), "--adapter", str(b),
                 "--weights", "0.7,0.3", "--out", str(tmp_path / "out"), "--shard-size", "20KB"])
    assert code == 0 and "merged from 2 adapter(s)" in capsys.readouterr().out
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # 20 KB shards: several files
    plain = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(plain), expected, atol=1e-4, rtol=0)
    # refuses to overwrite, then replaces with --overwrite
    assert main(["merge", "--model", str(base_dir), "--adapter", str(a), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["merge", "--model", str(base_dir), "--adapter", str(a), "--out", str(out),
                 "--overwrite", "--dtype", "bfloat16"]) == 0
    assert AutoModelForCausalLM.from_pretrained(out).model.layers[0].mlp.up_proj.weight.dtype \
        == torch.bfloat16


def test_export_hf_copies_the_base(base_dir, tmp_path):
    assert main(["export", "hf", "--model", str(base_dir), "--out", str(tmp_path / "o")]) == 0
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "o")),
                               logits(AutoModelForCausalLM.from_pretrained(base_dir)))


def test_bad_input(base_dir, tmp_path, capsys):
    folder = _adapter(base_dir, tmp_path, LoraConfig(r=4), "ad", 1)
    with pytest.raises(AdapterError, match="2 weights given for 1 adapters"):
        read_adapters([folder], [0.5, 0.5])
    with pytest.raises(ValueError, match="is inside the input folder"):
        merge_folder(base_dir, read_adapters([folder], None), base_dir / "merged")
    moe = _adapter(base_dir, tmp_path, MoeLoraConfig(r=2, num_experts=2), "moe", 1)
    with pytest.raises(AdapterError, match="moe_lora adapter cannot be merged: MoE-LoRA's update "
                                           "depends on each token's routing"):
        read_adapters([moe], None)
    other = tiny_llama()
    other.config.hidden_size = 48
    other = type(other)(other.config)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(AdapterError, match=r"down_proj.lora_B.weight has shape \(32, 4\), but .* "
                                           r"of shape \(48, 64\).*another base model"):
        merge_folder(tmp_path / "other", read_adapters([folder], None), tmp_path / "o2")
    assert not (tmp_path / "o2").exists()
    assert parse_size("500MB") == 500 * 2**20 and parse_size("2GB") == 2 * 2**30
    with pytest.raises(ValueError, match="expected a number with KB/MB/GB"):
        parse_size("lots")


def test_qlora_adapter_merges_into_the_4bit_values_it_trained_on(base_dir, tmp_path):
    from loratune.adapters import load_adapter
    from loratune.config import QuantConfig
    from loratune.export.merge import nf4_round_trip
    from loratune.models.quantize import quantize_model

    folder = _adapter(base_dir, tmp_path, LoraConfig(r=4, lora_alpha=8), "ad", seed=1)
    quant = QuantConfig(blocksize=64)
    live = AutoModelForCausalLM.from_pretrained(base_dir)
    quantize_model(live, quant)
    load_adapter(live, folder)
    expected = logits(live)
    config = json.loads((base_dir / "config.json").read_text())
    merge_folder(base_dir, read_adapters([folder], None), tmp_path / "q",
                 transform=nf4_round_trip(config, quant))
    merged = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "q"))
    torch.testing.assert_close(merged, expected, atol=1e-4, rtol=0)
    plain = logits(AutoModelForCausalLM.from_pretrained(
        merge_folder(base_dir, read_adapters([folder], None), tmp_path / "p").out))
    assert float((plain - expected).abs().max()) > 1e-3  # without the round trip it differs


def test_pruned_adalora_adapter_merges(base_dir, tmp_path):
    from loratune.adapters.adalora import adalora_modules
    from loratune.config import AdaLoraConfig

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    add_adapter(model, AdaLoraConfig(init_r=6, target_r=3, total_step=10,
                                     target_modules=["q_proj", "down_proj"]), "ad")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for i, (_, ad) in enumerate(adalora_modules(model, "ad")):
            ad.lora_E.copy_(torch.randn(ad.lora_E.shape, generator=g))
            ad.set_kept(torch.arange(6) % (2 + i % 2) == 0)  # ranks 3 or 2: pruned, uneven
    expected = logits(model)
    save_adapter(model, tmp_path / "ada", "ad")
    raw = json.loads((tmp_path / "ada" / "adapter_config.json").read_text())
    assert raw["peft_type"] == "ADALORA" and raw["rank_pattern"]
    merge_folder(base_dir, read_adapters([tmp_path / "ada"], None), tmp_path / "out")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(logits(plain), expected, atol=1e-4, rtol=0)


def _fill(folder, value: float):
    """Every tensor of the adapter's file set to `value`: finite in float32, so reading passes."""
    from safetensors.torch import load_file, save_file

    path = folder / "adapter_model.safetensors"
    save_file({k: torch.full_like(v, value) for k, v in load_file(path).items()}, path)
    return folder


def test_merge_refuses_non_finite_results_by_tensor_name_and_writes_nothing(base_dir, tmp_path):
    config = LoraConfig(r=4, target_modules="all-linear")
    out = tmp_path / "out"
    merge_folder(base_dir, read_adapters([_adapter(base_dir, tmp_path, config, "ok", 1)], None),
                 out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    huge = _fill(_adapter(base_dir, tmp_path, config, "huge", 2), 3e38)
    with pytest.raises(AdapterError) as err:
        merge_folder(base_dir, read_adapters([huge], None), out, overwrite=True)
    message = str(err.value)
    assert message.startswith(f"{out}: the merge gives NaN or Inf in 14 tensors as float32 (")
    assert message.endswith(", and 11 more); nothing was written. Check the adapters' values "
                            "(or the weights given with --weights), or write a wider --dtype")
    named = message.split(" (", 1)[1].split(", and")[0].split(", ")
    assert len(named) == 3 and all(n.endswith("_proj.weight") for n in named)
    # the merge that was there is untouched, and no temp folder is left beside it
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "huge", "ok", "out"]


def test_merge_checks_values_in_the_dtype_written(base_dir, tmp_path):
    # B·A is about 1e7 per entry: finite in float32 and bfloat16, past float16's 65504.
    big = _fill(_adapter(base_dir, tmp_path, LoraConfig(r=4, target_modules=["q_proj"]), "big",
                         1), 1e3)
    merge_folder(base_dir, read_adapters([big], None), tmp_path / "f32")
    merge_folder(base_dir, read_adapters([big], None), tmp_path / "bf16", dtype="bfloat16")
    with pytest.raises(AdapterError, match=r"NaN or Inf in 2 tensors as float16 \("
                                           r"model\.layers\.\d\.self_attn\.q_proj\.weight, "):
        merge_folder(base_dir, read_adapters([big], None), tmp_path / "f16", dtype="float16")
    assert not (tmp_path / "f16").exists()
