"""GRPO prompts from a mixture (data.train as a list) and held-out prompts from a list."""

import json

from loratune.config import build_config
from loratune.recipes.grpo import read_prompts


def _file(tmp_path, name, words):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Say {w}", "answer": w}) + "\n"
                            for w in words))
    return str(path)


def test_grpo_reads_a_mixture_of_prompt_files(tmp_path, smol_tokenizer):
    a = _file(tmp_path, "a", ["apple", "river", "stone", "cloud"])
    b = _file(tmp_path, "b", ["green", "metal"])
    held = _file(tmp_path, "h", ["piano", "tiger", "lemon"])
    cfg = build_config({"data": {"train": [{"path": a, "epochs": 1}, {"path": b, "epochs": 3}],
                                 "eval": [held, b]},
                        "train": {"objective": "grpo", "rl": {"rewards": [
                            {"function": "exact_match"}]}}})
    lines = []
    rows, held_rows = read_prompts(cfg, smol_tokenizer, lines.append)
    assert len(rows) == 4 + 6 and len(held_rows) == 3 + 2
    assert [r.columns.get("answer") for r in rows].count("metal") == 3   # b three times over
    assert lines and lines[0].startswith("mixture (seed 42): ")


def test_grpo_refuses_new_tokens_by_name(tmp_path):
    import pytest

    from loratune.config import ConfigError
    from loratune.recipes.grpo import train_grpo

    cfg = build_config({"output_dir": str(tmp_path / "g"), "data": {"add_tokens": ["<rx>"]},
                        "train": {"objective": "grpo", "rl": {"rewards": [
                            {"function": "exact_match"}]}}})
    with pytest.raises(ConfigError, match="train.objective grpo does not grow the vocabulary"):
        train_grpo(cfg, quiet=True)
    assert not (tmp_path / "g").exists()   # refused before the run folder or model
