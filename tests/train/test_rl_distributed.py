"""GRPO on several processes: 2 CPU ranks (gloo, torchrun --standalone) against 1 process.

Each rank rolls out its own groups (sampled as the same global rows one process samples),
advantages see the whole step (scale_rewards batch: the global std), the normalisers span the
step and gradients are summed: 2 ranks x 1 group equal 1 process x 2 groups. The same file is
the worker torchrun starts (`this_file SPEC.json` runs every job on every rank).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loratune import cli
from loratune.config import build_config
from loratune.recipes import grpo as recipe
from loratune.train import distributed as lt_dist

if __name__ == "__main__":  # a torchrun worker runs this file as a script: tiny.py is one up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny import tiny_llama  # noqa: E402

REWARD_FILE = '''
def vowels(prompts, completions, **kw):
    return [sum(ch in "aeiou" for ch in c) / (1 + len(c)) for c in completions]
'''
WORDS = ["apple", "river", "stone", "cloud", "green", "metal", "piano", "tiger"]
LOSSES = {"grpo": {"scale_rewards": "batch"}, "dapo": {"beta": 0.1, "num_iterations": 2}}


def _cfg_dict(folder: Path, name: str, loss: str, steps: int = 2) -> dict:
    data, reward = folder / "prompts.jsonl", folder / "rewards.py"
    data.write_text("".join(json.dumps({"prompt": f"Say {w}"}) + "\n" for w in WORDS))
    reward.write_text(REWARD_FILE)
    return {"output_dir": str(folder / name), "adapter": {"r": 4, "lora_alpha": 8},
            "data": {"train": str(data)},
            "train": {"objective": "grpo", "max_steps": steps, "batch_size": 4, "grad_accum": 2,
                      "lr": 2e-2, "warmup_ratio": 0.0, "save_every": 2, "eval_every": 100,
                      "rl": {"num_generations": 4, "max_completion_length": 6, "loss": loss,
                             "temperature": 1.0, **LOSSES[loss],
                             "rewards": [{"function": f"{reward}:vowels"}]}}}


def _train(spec: dict, tok, resume: bool = False):
    return recipe.train_grpo(build_config(spec), model=tiny_llama(vocab=len(tok)),
                             tokenizer=tok, quiet=True, resume=resume)


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def launched(tmp_path_factory, smol_tokenizer):
    """1-process references (one thread, as torchrun's workers), then ONE torchrun launch."""
    tmp = tmp_path_factory.mktemp("rl_dist")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for loss in LOSSES:
            _train(_cfg_dict(tmp, f"one-{loss}", loss), smol_tokenizer)
        _train(_cfg_dict(tmp, "one-long", "grpo", steps=3), smol_tokenizer)
    finally:
        torch.set_num_threads(before)
    cut = tmp / "cut-long"   # the 3-step run as if killed right after its step-2 checkpoint
    shutil.copytree(tmp / "one-long", cut)
    (cut / "run_summary.json").unlink()
    shutil.rmtree(cut / "adapter")
    jobs = [{"spec": _cfg_dict(tmp, f"two-{loss}", loss)} for loss in LOSSES]
    jobs.append({"spec": _cfg_dict(tmp, "cut-long", "grpo", steps=3), "resume": True})
    spec = tmp / "spec.json"
    spec.write_text(json.dumps(jobs))
    cmd = lt_dist.torchrun_command(2, [str(Path(__file__).resolve()), str(spec)])
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-6000:]
    return tmp


def _assert_same(a: dict, b: dict, atol: float = 1e-5):
    assert a.keys() == b.keys() and max(float(t.abs().max()) for t in a.values()) > 0
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=atol, rtol=0, msg=k)


@pytest.mark.parametrize("loss", list(LOSSES))
def test_two_ranks_of_one_group_equal_one_process_of_two(launched, loss):
    one, two = launched / f"one-{loss}", launched / f"two-{loss}"
    _assert_same(_adapter(one), _adapter(two))
    # rank 0's metrics are the whole step's: rewards, advantages, lengths of both groups
    for a, b in zip(_records(one), _records(two), strict=True):
        for key in ("reward", "reward_std", "advantage_std", "completion_length", "loss",
                    "rows_updated", "kl", "clip_low_fraction"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), key


def test_a_one_process_checkpoint_resumes_on_two(launched):
    _assert_same(_adapter(launched / "one-long"), _adapter(launched / "cut-long"))
    assert [r["step"] for r in _records(launched / "cut-long")] == [1, 2, 3]


def test_fsdp_is_refused_before_torchrun(tmp_path, monkeypatch, capsys):
    config = tmp_path / "grpo.yaml"
    spec = _cfg_dict(tmp_path, "run", "grpo")
    spec["train"]["parallel"] = "fsdp"
    config.write_text(json.dumps(spec))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(lt_dist, "launch", lambda *a: pytest.fail("torchrun was started"))
    assert cli.main(["train", str(config), "--nproc", "2"]) == 2
    err = capsys.readouterr().err
    assert "train.parallel fsdp with train.objective grpo" in err and "ddp" in err
    assert not (tmp_path / "run").exists()


def _worker(spec_path: str) -> None:
    import os

    import torch.distributed as dist

    from loratune.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))  # one group for all jobs
    for job in json.loads(Path(spec_path).read_text()):
        try:
            _train(job["spec"], tok, resume=job.get("resume", False))
        except Exception:
            print(f"rank {os.environ['RANK']}: {traceback.format_exc()}", file=sys.stderr)
            raise


if __name__ == "__main__":
    _worker(sys.argv[1])
