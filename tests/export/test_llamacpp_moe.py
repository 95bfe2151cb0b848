"""Mixture-of-experts GGUF exports run by real llama.cpp (opt-in: `pytest -m llamacpp`, needs
llama-cpp-python): the qwen3moe, llama-with-experts and olmoe files give transformers' logits,
and an adapter on the routed experts, as llama.cpp's adapter file, gives the adapted model's.

Not run yet: written where llama-cpp-python had no wheel and its source build did not fit the
shared machine; TOL is a guess until a first run measures the gap."""

import numpy as np
import pytest
import torch

from loratune.export.gguf_file import write_gguf, write_lora_gguf
from tests.export.test_gguf_moe import FAMILIES, adapted, logits, save
from tests.models.test_moe_families import IDS

pytestmark = pytest.mark.llamacpp
llama_cpp = pytest.importorskip("llama_cpp")

TOL = 1e-3  # llama.cpp's f32 CPU kernels sum in another order than torch's


def llamacpp_logits(path, lora=None) -> torch.Tensor:
    kw = {"lora_path": str(lora)} if lora else {}
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False,
                          seed=0, n_threads=2, **kw)
    ids = IDS[0].tolist()
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
