"""`--task preference`: held-out pairs, chosen vs rejected log-probs, base and adapters."""

import json

import pytest

from loratune.cli import main
from loratune.config.commands import EvalCommandConfig
from loratune.config import build_config
from loratune.data import DataError
from loratune.eval.run import run_eval
from loratune.train import train
from tiny import tiny_llama, unigram_llama

APPLE, NO = 11977, 787  # " apple", " no"


def _pairs(tmp_path, rows, name="pairs.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_unigram_margin_by_hand(tmp_path, smol_tokenizer):
    """The answers differ in one token: ' apple' (logit 2) against ' no' (logit 0), so the
    chosen side is likelier by exactly 2 nats; the rejected-first pair by -2."""
    data = _pairs(tmp_path, [{"prompt": "q", "chosen": "apple apple", "rejected": "apple no"},
                             {"prompt": "q", "chosen": "apple no", "rejected": "apple apple"},
                             {"prompt": "r", "chosen": "apple apple", "rejected": "apple no"}])
    model = unigram_llama({APPLE: 2.0}, len(smol_tokenizer))
    result = run_eval(EvalCommandConfig(task="preference", data=str(data), batch_size=2),
                      model, smol_tokenizer).variants[0].result
    assert result.n == 3
    assert result.metrics["accuracy"] == pytest.approx(2 / 3)
    assert result.metrics["accuracy_norm"] == pytest.approx(2 / 3)
    assert result.metrics["margin"] == pytest.approx(2 / 3, abs=1e-5)  # (2 - 2 + 2) / 3
    assert [r["correct"] for r in result.rows] == [True, False, True]
    assert result.rows[0]["logp_chosen"] - result.rows[0]["logp_rejected"] == \
        pytest.approx(2.0, abs=1e-3)


def test_unpaired_data_is_refused(tmp_path, smol_tokenizer):
    data = _pairs(tmp_path, [{"prompt": "q", "completion": "a", "label": True}])
    with pytest.raises(DataError, match="pairs.jsonl:1: --task preference needs prompt/chosen/"
                       "rejected pairs"):
        run_eval(EvalCommandConfig(task="preference", data=str(data)),
                 tiny_llama(vocab=len(smol_tokenizer)), smol_tokenizer)


def test_a_dpo_adapter_beats_the_base_from_the_command_line(tmp_path, tiny_folder,
                                                            smol_tokenizer, capsys):
    words = ["apple", "river", "stone", "cloud", "green", "metal", "piano", "tiger"]
    data = _pairs(tmp_path, [{"prompt": f"Repeat {w}", "chosen": f"{w} {w}",
                              "rejected": f"I will not say {w}"} for w in words])
    cfg = build_config({"output_dir": str(tmp_path / "dpo"), "model": {"name": str(tiny_folder)},
                        "adapter": {"r": 4, "lora_alpha": 8},
                        "data": {"train": str(data), "max_length": 64},
                        "train": {"objective": "dpo", "max_steps": 10, "batch_size": 4,
                                  "lr": 3e-2, "warmup_ratio": 0.0}})
    result = train(cfg, quiet=True)
    assert main(["eval", "--model", str(tiny_folder), "--task", "preference", "--data",
                 str(data), "--adapter", str(result.adapter_dir)]) == 0
    report = json.loads((tmp_path / "dpo" / "eval-preference.json").read_text())
    base, tuned = (v["metrics"] for v in report["variants"])
    assert tuned["margin"] > base["margin"] + 1.0
    assert tuned["accuracy"] == 1.0
    assert "| accuracy |" in capsys.readouterr().out
