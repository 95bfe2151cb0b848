"""The method registry: a method defined in this file alone trains, saves and reloads through
loratune's own train(), save and load; every command takes its facts from its record."""

import json
from types import SimpleNamespace
from typing import Literal

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from loratune.adapters import (AdapterError, LayerAdapter, MethodRecord, TrainingHooks,
                               add_adapter, load_adapter, merge, method_names, method_record,
                               register, save_adapter, unregister)
from loratune.adapters.host import leaf_names
from loratune.adapters.registry import FileSpec, MergeSpec, TrainingSpec
from loratune.config import (AdapterConfig, BottleneckConfig, IA3Config, LoHaConfig, LoKrConfig,
                             LoraConfig, build_config)
from loratune.train import train
from tiny import tiny_llama


# -- the toy method: a trained shift per output channel of each targeted linear layer ----------
class ToyShiftConfig(AdapterConfig):
    method: Literal["toy_shift"] = "toy_shift"
    target_modules: list[str] | str = "all-linear"
    gain: float = 1.0  # an option of the method's own, which must survive the file


class ToyShift(LayerAdapter):
    def __init__(self, out_features: int, config: ToyShiftConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.shift = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))

    def add_to(self, out, x, weight=1.0, base=None, base_out=None):
        return out + (weight * self.config.gain) * self.shift.to(out.dtype)

    def file_tensors(self):
        return {"toy_shift": self.shift}


def new_toy_shift(config, path, in_features, out_features, *, r=None, alpha=None, device=None,
                  dtype=None):
    return ToyShift(out_features, config, device, dtype)


class ToyHooks(TrainingHooks):
    """Counts optimizer steps and reports them in run_summary.json."""

    def __init__(self):
        self.steps = 0

    def after_step(self, step):
        self.steps = step

    def summary(self):
        return {"toy_steps": self.steps}


TOY = MethodRecord(
    name="toy_shift", config_class=ToyShiftConfig, peft_type="TEST_TOY_SHIFT",
    files=FileSpec(("toy_shift",), peft_fields=lambda model, name, config, compact: {
        "target_modules": leaf_names(model, name, config.target_modules)}),
    make_layer=new_toy_shift,
    training=TrainingSpec(hooks=lambda model, config, name, total_steps: ToyHooks(),
                          why_no_packing="toy rows stand alone",
                          why_single_process="the toy counts steps in one process"),
    merge=MergeSpec(why_not="the toy keeps its shift apart"))


@pytest.fixture(scope="module", autouse=True)
def toy_registered():
    register(TOY)
    yield
    unregister("toy_shift")


def _toy_cfg(tmp_path, data_file, **data):
    return build_config({
        "output_dir": str(tmp_path / "toy"),
        "adapter": {"method": "toy_shift", "gain": 2.0},
        "data": {"train": str(data_file), "max_length": 64, **data},
        "train": {"max_steps": 8, "batch_size": 4, "lr": 2e-2, "warmup_ratio": 0.0},
    })


def test_toy_method_trains_saves_and_reloads(tmp_path, data_file, smol_tokenizer):
    model = tiny_llama(vocab=len(smol_tokenizer))
    result = train(_toy_cfg(tmp_path, data_file), model=model, tokenizer=smol_tokenizer,
                   quiet=True)
    losses = [h["loss"] for h in result.history]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.1, losses
    summary = json.loads((result.output_dir / "run_summary.json").read_text())
    assert summary["method"] == "toy_shift" and summary["toy_steps"] == 8  # its hooks ran
    assert summary["packing"] is False  # its record forbids packing

    written = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert written["peft_type"] == "TEST_TOY_SHIFT" and written["gain"] == 2.0
    assert written["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                         "up_proj", "v_proj"]  # its peft_fields
    keys = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert len(keys) == 2 * 7 and all(k.endswith(".toy_shift") for k in keys)

    ids = torch.tensor([[5, 900, 17, 4000, 31]])
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        base = tiny_llama(vocab=len(smol_tokenizer))
        plain = base(input_ids=ids).logits
        config = load_adapter(base, result.adapter_dir)
        assert isinstance(config, ToyShiftConfig) and config.gain == 2.0
        torch.testing.assert_close(base(input_ids=ids).logits, trained, atol=1e-5, rtol=0)
    assert (trained - plain).abs().max() > 0.1  # the adapter matters to the logits


def test_toy_records_facts_reach_every_command(tmp_path, data_file, smol_tokenizer):
    from loratune.export.merge import read_adapters
    from loratune.train import distributed as lt_dist
    from loratune.train.loop import build_data

    model = tiny_llama()
    add_adapter(model, ToyShiftConfig(target_modules=["q_proj"]))
    with pytest.raises(AdapterError, match="cannot be merged: the toy keeps its shift apart"):
        merge(model)
    save_adapter(model, tmp_path / "a")
    with pytest.raises(AdapterError, match="toy_shift adapter cannot be merged: the toy keeps"):
        read_adapters([tmp_path / "a"], None)
    with pytest.raises(ValueError, match=r"packing: true does not work with adapter.method: "
                                         r"toy_shift \(toy rows stand alone\)"):
        build_data(_toy_cfg(tmp_path, data_file, packing=True), smol_tokenizer)
    opts = SimpleNamespace(grad_accum=2, batch_size=2, parallel="ddp", deepspeed=None)
    with pytest.raises(lt_dist.DistributedError, match=r"toy_shift is not supported on several "
                                                       r"processes \(the toy counts steps"):
        lt_dist.check_parallel_options(opts, "toy_shift", lt_dist.DistInfo(0, 2, 0))


def test_unregistered_method_is_refused_by_name():
    with pytest.raises(AdapterError, match=r"unknown method 'nope'; choose from lora, dora"):
        method_record("nope")
    model = tiny_llama()
    unregister("toy_shift")
    try:
        with pytest.raises(AdapterError, match="unknown method 'toy_shift'"):
            add_adapter(model, ToyShiftConfig())
    finally:
        register(TOY)


def test_a_record_is_either_layer_or_model_level():
    with pytest.raises(ValueError, match="exactly one of make_layer"):
        MethodRecord(name="toy_shift", config_class=ToyShiftConfig, peft_type="X", files=FileSpec(()))
    with pytest.raises(ValueError, match=r"ToyShiftConfig.method does not allow it"):
        MethodRecord(name="other", config_class=ToyShiftConfig, peft_type="X", files=FileSpec(()),
                     make_layer=new_toy_shift)


BUILTIN = {"lora": LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
           "dora": LoraConfig(r=4, use_dora=True, target_modules=["q_proj"]),
           "ia3": IA3Config(), "bottleneck": BottleneckConfig(bottleneck_size=4),
           "loha": LoHaConfig(r=2), "lokr": LoKrConfig(r=2, decompose_both=True)}


@pytest.mark.parametrize("method", sorted(BUILTIN))
def test_builtin_files_match_their_records(tmp_path, method):
    """Every tensor a method writes has a kind its record declares, under its peft_type."""
    record = method_record(method)
    model = tiny_llama()
    add_adapter(model, BUILTIN[method])
    save_adapter(model, tmp_path / method)
    written = json.loads((tmp_path / method / "adapter_config.json").read_text())
    assert written["peft_type"] == record.peft_type
    keys = load_file(str(tmp_path / method / "adapter_model.safetensors"))
    assert keys and all(any(k.endswith("." + kind) for kind in record.files.keys) for k in keys)
    assert method in method_names()


def test_rank_zero_is_an_error_naming_r():
    from loratune.adapters import LoraAdapter

    cfg = LoraConfig(r=4)
    assert LoraAdapter(8, 8, cfg).r == 4  # None: the config's rank
    with pytest.raises(AdapterError, match=r"r=0: the rank must be greater than 0"):
        LoraAdapter(8, 8, cfg, r=0)
    with pytest.raises(AdapterError, match=r"r=0: the rank must be greater than 0 .*rank_pattern"):
        add_adapter(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]),
                    rank_pattern={"q_proj": 0})
