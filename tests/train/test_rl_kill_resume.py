"""Exact resume of a GRPO run killed mid-rollout and mid-update.

The slow test starts `loratune train` on a tiny GRPO config in a subprocess, holds it at a
named point (train/stop_points.py: LORATUNE_STOP_AT, a marker file says it got there), kills
it with SIGKILL, resumes it with `--resume` and compares the final adapter with an
uninterrupted run's (1e-6). The fast stand-in does the same in this process, the hold raising
instead of waiting, and checks that each point is where its name says.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from loratune.config import build_config
from loratune.recipes import grpo as recipe
from loratune.train import stop_points
from tiny import tiny_llama

REWARD_FILE = '''
def vowels(prompts, completions, **kw):
    return [sum(ch in "aeiou" for ch in c) / (1 + len(c)) for c in completions]
'''
WORDS = ["apple", "river", "stone", "cloud", "green", "metal", "piano", "tiger"]


def _cfg_dict(tmp_path, name: str, model: str | None = None) -> dict:
    data, reward = tmp_path / "prompts.jsonl", tmp_path / "rewards.py"
    data.write_text("".join(json.dumps({"prompt": f"Say {w}"}) + "\n" for w in WORDS))
    reward.write_text(REWARD_FILE)
    cfg = {"output_dir": str(tmp_path / name), "adapter": {"r": 4, "lora_alpha": 8},
           "data": {"train": str(data)},
           "train": {"objective": "grpo", "max_steps": 4, "batch_size": 4, "grad_accum": 2,
                     "lr": 2e-2, "warmup_ratio": 0.0, "save_every": 2, "eval_every": 100,
                     "rl": {"num_generations": 4, "max_completion_length": 6, "beta": 0.1,
                            "num_iterations": 2, "rewards": [{"function": f"{reward}:vowels"}]}}}
    if model:
        cfg["model"] = {"name": model, "device": "cpu", "dtype": "float32"}
    return cfg


def _adapter(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


def _assert_same_run(cut, whole):
    a, b = _adapter(whole), _adapter(cut)
    assert a.keys() == b.keys() and max(float(t.abs().max()) for t in a.values()) > 0
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=k)
    records = [[json.loads(x) for x in (f / "metrics.jsonl").read_text().splitlines()]
               for f in (cut, whole)]
    assert [r["step"] for r in records[0]] == [1, 2, 3, 4]
    assert [r["reward"] for r in records[0]] == pytest.approx([r["reward"] for r in records[1]])
    samples = [(f / "completions.jsonl").read_text().splitlines() for f in (cut, whole)]
    assert [json.loads(x)["step"] for x in samples[0]] == [json.loads(x)["step"]
                                                          for x in samples[1]]


# ------------------------------------------------------------------ fast: in this process


class Held(Exception):
    pass


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory, smol_tokenizer):
    tmp = tmp_path_factory.mktemp("whole")
    recipe.train_grpo(build_config(_cfg_dict(tmp, "whole")), quiet=True,
                      model=tiny_llama(vocab=len(smol_tokenizer)), tokenizer=smol_tokenizer)
    return tmp / "whole"


@pytest.mark.parametrize("point,done", [("rollout:3", 2), ("update:4", 3)])
def test_held_mid_step_then_resumed_is_exact(tmp_path, smol_tokenizer, whole_run, monkeypatch,
                                             point, done):
    cfg = build_config(_cfg_dict(tmp_path, "cut"))
    model = tiny_llama(vocab=len(smol_tokenizer))
    seen = {}

    def raise_here(where):
        metrics = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        seen.update(steps=len(metrics), training=model.training,
                    grads=any(g is not None and g.abs().max() > 0 for g in grads))
        raise Held(where)

    monkeypatch.setenv(stop_points.STOP_AT, point)
    monkeypatch.setattr(stop_points, "hold", raise_here)
    with pytest.raises(Held, match=point):
        recipe.train_grpo(cfg, model=model, tokenizer=smol_tokenizer, quiet=True)
    assert seen["steps"] == done  # held inside step `done + 1`
    if point.startswith("rollout"):
        assert not seen["training"] and not seen["grads"]   # sampling: eval mode, no grads yet
    else:
        assert seen["training"] and seen["grads"]  # a micro-batch's gradients, not yet applied
    recipe.train_grpo(cfg, model=tiny_llama(vocab=len(smol_tokenizer)), tokenizer=smol_tokenizer,
                      quiet=True, resume=True)
    _assert_same_run(tmp_path / "cut", whole_run)


# ------------------------------------------------- slow: `loratune train`, SIGKILL, --resume


def _train(config, *flags, stop_at: str | None = None, marker=None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != stop_points.STOP_AT}
    if stop_at:
        env.update({stop_points.STOP_AT: stop_at, stop_points.MARKER: str(marker)})
    return subprocess.Popen([sys.executable, "-m", "loratune", "train", str(config), "--quiet",
                             *flags], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _kill_when_held(proc: subprocess.Popen, marker) -> None:
    deadline = time.monotonic() + 600
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists(), f"the run never reached its stop point:\n{proc.communicate()[0]}"
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


@pytest.mark.slow
def test_kill_9_mid_rollout_and_mid_update_then_resume(tmp_path, tiny_folder):
    configs = {}
    for name in ("whole", "rollout", "update"):
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(json.dumps(_cfg_dict(tmp_path, name, str(tiny_folder))))
    whole = _train(configs["whole"])
    cut = {name: _train(configs[name], stop_at=f"{name}:{step}",
                        marker=tmp_path / f"{name}.held")
           for name, step in (("rollout", 3), ("update", 4))}
    for name, proc in cut.items():
        _kill_when_held(proc, tmp_path / f"{name}.held")
        assert not (tmp_path / name / "adapter").exists()
        saved = (tmp_path / name / "checkpoints").iterdir()
        assert [int(p.name.split("-")[1]) for p in saved] == [2]   # killed after checkpoint 2
    resumed = [_train(configs[name], "--resume") for name in cut]
    for proc in [whole, *resumed]:
        out = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, out
    for name in cut:
        _assert_same_run(tmp_path / name, tmp_path / "whole")


def test_a_method_that_cannot_resume_is_refused(tmp_path, smol_tokenizer):
    """Prefix tuning with prefix_projection checkpoints the computed prefixes, not the MLP
    (its record's why_no_resume): --resume says so, as SFT does, instead of going on."""
    from loratune.train import RunFolderError

    spec = _cfg_dict(tmp_path, "prefix")
    spec["adapter"] = {"method": "prefix", "num_virtual_tokens": 4, "prefix_projection": True}
    spec["train"].update(max_steps=1, save_every=1)
    cfg = build_config(spec)
    recipe.train_grpo(cfg, model=tiny_llama(vocab=len(smol_tokenizer)), tokenizer=smol_tokenizer,
                      quiet=True)
    (tmp_path / "prefix" / "run_summary.json").unlink()  # as if killed after its checkpoint
    with pytest.raises(RunFolderError, match="resume is not supported for adapter.method: "
                                             "prefix.*prefix_projection"):
        recipe.train_grpo(cfg, model=tiny_llama(vocab=len(smol_tokenizer)),
                          tokenizer=smol_tokenizer, quiet=True, resume=True)
