"""GRPO under several processes is refused, clearly and before any worker starts.

Rollouts per rank are not written yet: `loratune train --nproc 2` on a GRPO config fails in
the launching process (no torchrun), and a torchrun started by hand fails in the recipe, both
with the same message.
"""

from __future__ import annotations

import json

import pytest

from loratune import cli
from loratune.config import build_config
from loratune.recipes import grpo as recipe
from loratune.train import distributed as lt_dist

CONFIG = {"train": {"objective": "grpo", "batch_size": 4, "grad_accum": 2,
                    "rl": {"num_generations": 4, "rewards": [{"function": "exact_match"}]}}}
SAID = "train.objective grpo runs in one process, not 2"


def test_nproc_2_is_refused_before_torchrun(tmp_path, monkeypatch, capsys):
    config = tmp_path / "grpo.yaml"
    config.write_text(json.dumps({**CONFIG, "output_dir": str(tmp_path / "run")}))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(lt_dist, "launch", lambda *a: pytest.fail("torchrun was started"))
    assert cli.main(["train", str(config), "--nproc", "2"]) == 2
    err = capsys.readouterr().err
    assert SAID in err and "without --nproc" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_hand_started_torchrun_is_refused_by_the_recipe(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    cfg = build_config({**CONFIG, "output_dir": str(tmp_path / "run")})
    with pytest.raises(lt_dist.DistributedError, match=SAID):
        recipe.train_grpo(cfg, quiet=True)
    assert not (tmp_path / "run").exists()


def test_sft_still_launches(tmp_path, monkeypatch):
    lt_dist.check_objective("sft", 2)
    lt_dist.check_objective("grpo", 1)
