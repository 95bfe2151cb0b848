"""`generate`: the four metrics on hand-checked strings, and end to end on a model whose
greedy answer is known."""

import math

import pytest
import sacrebleu

from loratune.config.commands import EvalCommandConfig
from loratune.eval.run import run_eval
from loratune.eval.text_metrics import bleu, generation_scores, rouge_l, token_f1, words
from tiny import unigram_llama

APPLE = 11977


def test_token_f1_by_hand():
    assert token_f1("The cat sat.", "a cat sat on the mat") == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert token_f1("Paris", "paris!") == 1.0
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0
    assert words("北京是首都, ok") == ["北", "京", "是", "首", "都", "ok"]
    # 北京 vs 北京市: 2 common of 2 and 3
    assert token_f1("北京", "北京市") == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))


def test_rouge_l_and_bleu_by_hand():
    # LCS of "a b c d" and "a x c d e": a c d = 3; P 3/4, R 3/5
    assert rouge_l(["a b c d"], ["a x c d e"]) == pytest.approx([2 * 0.75 * 0.6 / 1.35])
    assert rouge_l(["我爱北京"], ["我爱上海"]) == pytest.approx([0.5])  # 我 爱 of 4 each
    # every n-gram precision 1, brevity penalty exp(1 - 6/4)
    assert bleu(["a b c d"], ["a b c d e f"]) == pytest.approx(100 * math.exp(-0.5))
    assert bleu(["the same sentence here"], ["the same sentence here"]) == pytest.approx(100)


def test_generate_task_on_a_model_that_always_says_apple(data_file, smol_tokenizer):
    """The references are "apple apple apple", "river river river", ...: the unigram model's
    greedy "apple apple apple" matches the first of 8 exactly and shares no word with the rest."""
    model = unigram_llama({APPLE: 20.0}, len(smol_tokenizer))
    cfg = EvalCommandConfig(task="generate", data=str(data_file), max_new_tokens=3)
    result = run_eval(cfg, model, smol_tokenizer).variants[0].result
    refs = [r["reference"] for r in result.rows]
    assert [r["prediction"] for r in result.rows] == ["apple apple apple"] * 8
    assert result.metrics["exact_match"] == result.metrics["token_f1"] == 1 / 8
    assert result.metrics["rouge_l"] == 1 / 8
    assert result.metrics["bleu"] == pytest.approx(
        sacrebleu.corpus_bleu(["apple apple apple"] * 8, [refs]).score)
    assert result.rows[0]["prompt"] == "Repeat the word apple"


def test_metrics_refuse_mismatched_lengths():
    with pytest.raises(ValueError, match="1 predictions for 2 references"):
        generation_scores(["a"], ["a", "b"])


def test_a_missing_metric_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "sacrebleu", None)
    with pytest.raises(ImportError, match=r"pip install 'loratune\[eval\]'"):
        bleu(["a"], ["a"])
