"""Mixture-of-experts GGUF exports run by real llama.cpp (opt-in: `pytest -m llamacpp`, needs
llama-cpp-python): the qwen3moe, llama-with-experts and olmoe files give transformers' logits,
and an adapter on the routed experts, as llama.cpp's adapter file, gives the adapted model's.

Also GPT-OSS (YaRN, sinks, the sliding window: 200 positions), DeepSeek-V3 and DeepSeek-V2-Lite
(MLA, shared experts, their routing) and both DeepSeeks with YaRN, over the same 200 positions.
Run with llama-cpp-python 0.3.36 built from its sdist (llama.cpp of late 2026)."""

import numpy as np
import pytest
import torch

from loratune.export.gguf_file import write_gguf, write_lora_gguf
from tests.export.test_gguf_moe import FAMILIES, adapted, logits, save
from tests.export.test_gguf_deepseek import V2_YARN, V3_YARN, deepseek_v2
from tests.export.test_gguf_moe_more import LONG, deepseek_v3, gpt_oss
from tests.models.test_moe_families import IDS

pytestmark = pytest.mark.llamacpp
llama_cpp = pytest.importorskip("llama_cpp")

TOL = 1e-3  # llama.cpp's f32 CPU kernels sum in another order than torch's


def llamacpp_logits(path, lora=None, ids=IDS) -> torch.Tensor:
    kw = {"lora_path": str(lora)} if lora else {}
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(64, ids.shape[1]), logits_all=True,
                          verbose=False, seed=0, n_threads=2, n_batch=ids.shape[1],
                          n_ubatch=ids.shape[1], **kw)
    ids = ids[0].tolist()
    llm.eval(ids)
    return torch.from_numpy(np.asarray(llm.scores[: len(ids)], dtype=np.float32))


@pytest.mark.parametrize("name", FAMILIES)
def test_llamacpp_runs_the_moe_file_with_transformers_logits(name, tmp_path):
    model = save(name, tmp_path / "m")
    path = write_gguf(tmp_path / "m", tmp_path / "m.gguf", "f32")
    torch.testing.assert_close(llamacpp_logits(path), logits(model)[0], atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_llamacpp_applies_the_expert_lora_file_as_the_adapted_model(name, tmp_path):
    model, base, adapter = adapted(name, tmp_path)
    plain = write_gguf(base, tmp_path / "base.gguf", "f32")
    lora = write_lora_gguf(adapter, base, tmp_path / "a.gguf")
    got = llamacpp_logits(plain, lora)
    assert (got - llamacpp_logits(plain)).abs().max() > 10 * TOL  # the adapter is applied
    torch.testing.assert_close(got, logits(model)[0], atol=TOL, rtol=0)


def _saved(build_model, folder, **fields):
    model, tok = build_model(**fields)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model


BUILDS = {"gpt_oss": (gpt_oss, {}), "deepseek_v3": (deepseek_v3, {}),
          "deepseek_v2_lite": (deepseek_v2, {}),
          "deepseek_v2_lite_yarn": (deepseek_v2, dict(rope_parameters=dict(V2_YARN),
                                                      initializer_range=0.1)),
          "deepseek_v3_yarn": (deepseek_v3, dict(rope_parameters=dict(V3_YARN),
                                                 initializer_range=0.1))}


@pytest.mark.parametrize("name", BUILDS)
def test_llamacpp_runs_gpt_oss_and_deepseek_files_with_transformers_logits(name, tmp_path):
    build_model, fields = BUILDS[name]
    model = _saved(build_model, tmp_path / "m", **fields)
    path = write_gguf(tmp_path / "m", tmp_path / "m.gguf", "f32")
    with torch.no_grad():
        want = model(LONG).logits[0]
    got = llamacpp_logits(path, ids=LONG)
    # the YaRN models' larger weights (initializer_range 0.1) give logits up to ~3: the summation
    # order's gap grows with them (measured max 1.6e-3, mean 6e-5, not growing with position)
    torch.testing.assert_close(got, want, atol=TOL * max(1.0, want.abs().max().item()), rtol=0)
    assert (got - want).abs().mean() < 1e-4


def test_llamacpp_runs_a_round_yarn_gpt_oss_as_the_rounded_model(tmp_path):
    """--round-yarn: the truncate: false model written as llama.cpp runs it, truncate: true."""
    import json

    rounded = _saved(gpt_oss, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["rope_parameters"]["truncate"] = False
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    path = write_gguf(tmp_path / "m", tmp_path / "m.gguf", "f32", round_yarn=True)
    with torch.no_grad():
        want = rounded(LONG).logits[0]
    torch.testing.assert_close(llamacpp_logits(path, ids=LONG), want, atol=TOL, rtol=0)


def test_llamacpp_applies_a_gpt_oss_expert_lora_file_as_the_adapted_model(tmp_path):
    """GPT-OSS's experts hold gate and up interleaved: the adapter's B rows alternate."""
    from tests.export.test_gguf_moe_more import adapted as gpt_oss_adapted

    model, base, adapter = gpt_oss_adapted(tmp_path)
    plain = write_gguf(base, tmp_path / "base.gguf", "f32")
    lora = write_lora_gguf(adapter, base, tmp_path / "a.gguf")
    got = llamacpp_logits(plain, lora, ids=LONG)
    assert (got - llamacpp_logits(plain, ids=LONG)).abs().max() > 10 * TOL
    with torch.no_grad():
        torch.testing.assert_close(got, model(LONG).logits[0], atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["deepseek_v3", "deepseek_v2_lite"])
def test_llamacpp_applies_a_deepseek_lora_file_on_experts_shared_experts_and_o_proj(name,
                                                                                    tmp_path):
    from loratune.adapters import add_adapter, save_adapter
    from loratune.config import LoraConfig
    from loratune.export.merge import merge_folder, read_adapters
    from tests.adapters.test_expert_lora import randomize

    build_model, _ = BUILDS[name]
    _saved(build_model, tmp_path / "base")
    model, _ = build_model()
    add_adapter(model, LoraConfig(r=2, lora_alpha=8, target_modules=[
        "experts", "shared_experts", "o_proj"]))
    randomize(model)
    save_adapter(model, tmp_path / "a")
    plain = write_gguf(tmp_path / "base", tmp_path / "base.gguf", "f32")
    lora = write_lora_gguf(tmp_path / "a", tmp_path / "base", tmp_path / "a.gguf")
    got = llamacpp_logits(plain, lora, ids=LONG)
    assert (got - llamacpp_logits(plain, ids=LONG)).abs().max() > 10 * TOL
    # the file applied equals the merge run by llama.cpp (measured 2.5e-6); the merged model
    # itself is within llama.cpp's gap of transformers (V3's routing ties here: 2.3e-3 at two
    # positions, mean 1e-4), as the base files are above
    merged = merge_folder(tmp_path / "base", read_adapters([tmp_path / "a"], None),
                          tmp_path / "merged").out
    torch.testing.assert_close(got, llamacpp_logits(write_gguf(merged, tmp_path / "m.gguf", "f32"),
                                                    ids=LONG), atol=1e-4, rtol=0)
    with torch.no_grad():
        want = model(LONG).logits[0]
    torch.testing.assert_close(got, want, atol=3 * TOL, rtol=0)
    assert (got - want).abs().mean() < 1e-4
