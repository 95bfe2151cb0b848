"""loratune as an lm-evaluation-harness model, run on the bundled local task YAML."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (the harness extra)")

import loratune.eval  # noqa: E402
import loratune.eval.harness  # noqa: E402,F401  (registers the model)
from loratune.adapters import add_adapter, load_adapter, save_adapter  # noqa: E402
from loratune.config import LoraConfig, ModelConfig  # noqa: E402
from loratune.models import load_model  # noqa: E402
from tiny import randomize_lora, tiny_llama  # noqa: E402

SAMPLE = Path(loratune.eval.__file__).parent / "samples" / "harness"
TASK = "loratune_sample_mc"


@pytest.fixture
def task_dir(tmp_path, monkeypatch):
    """The bundled YAML and its data in a fresh folder (data_files is relative to it), offline."""
    folder = tmp_path / "tasks"
    shutil.copytree(SAMPLE, folder)
    monkeypatch.chdir(folder)
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    return folder


def evaluate(task_dir, model_args: str) -> dict:
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model="loratune", model_args=model_args, tasks=[TASK],
                                   task_manager=TaskManager(include_path=str(task_dir)),
                                   log_samples=True, bootstrap_iters=0)


def by_hand(model, tok, context: str, continuation: str) -> float:
    """One forward of the whole text; the continuation's tokens are those after the context's
    (lm_eval's split)."""
    ctx = tok(context)["input_ids"]
    whole = tok(context + continuation)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    return sum(logp[t - 1, whole[t]].item() for t in range(len(ctx), len(whole)))


def check_against(result: dict, model, tok) -> list[float]:
    samples = result["samples"][TASK]
    assert len(samples) == 4
    hits, scores = 0, []
    for s in samples:
        got = [r[0][0] for r in s["resps"]]
        want = [by_hand(model, tok, c, o) for c, o in s["arguments"]]
        assert got == pytest.approx(want, abs=1e-4)
        hits += max(range(4), key=got.__getitem__) == s["target"]
        scores += got
    assert result["results"][TASK]["acc,none"] == hits / 4
    return scores


def test_base_adapter_and_4bit_paths_score_like_our_own_forward(task_dir, tiny_folder,
                                                                smol_tokenizer, tmp_path):
    base_model, tok = load_model(str(tiny_folder))
    base = check_against(evaluate(task_dir, f"model={tiny_folder}"), base_model, tok)

    lora = tiny_llama(vocab=len(smol_tokenizer))
    add_adapter(lora, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    adapter = save_adapter(randomize_lora(lora, scale=1.0), tmp_path / "adapter")
    with_adapter, _ = load_model(str(tiny_folder))
    load_adapter(with_adapter, adapter)
    adapted = check_against(evaluate(task_dir, f"model={tiny_folder},adapter={adapter}"),
                            with_adapter, tok)
    assert adapted != pytest.approx(base, abs=1e-3)

    four_bit, _ = load_model(ModelConfig(name=str(tiny_folder), quantization={"type": "nf4"}))
    check_against(evaluate(task_dir, f"model={tiny_folder},quantize=nf4"), four_bit, tok)


def test_lm_eval_command_line_with_the_loratune_model(task_dir, tiny_folder, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-m", "loratune.eval.harness", "run", "--model", "loratune",
         "--model_args", f"model={tiny_folder}", "--tasks", TASK, "--include_path", ".",
         "--output_path", str(tmp_path / "out")],
        cwd=task_dir, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = list((tmp_path / "out").rglob("results_*.json"))
    assert len(results) == 1
    assert 0 <= json.loads(results[0].read_text())["results"][TASK]["acc,none"] <= 1
