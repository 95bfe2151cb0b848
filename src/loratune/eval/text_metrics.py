"""Generation metrics: exact match, token F1, ROUGE-L (rouge-score) and BLEU (sacrebleu).

Words are lower-cased runs of letters and digits; each CJK character is a word of its own
(Chinese has no spaces, so a whitespace split would make a sentence one word). Token F1 is
SQuAD's: punctuation and the articles a/an/the dropped, F1 of the bag of words. ROUGE-L uses
the same words (rouge-score's own tokenizer drops every non-ASCII character). BLEU is
sacrebleu's corpus BLEU (0-100), with its `zh` tokenizer when a reference holds CJK text and
`13a` otherwise.
"""

from __future__ import annotations

import re
from collections import Counter

from loratune.eval.answer_match import exact_match

EXTRA = "eval"  # pip install 'loratune[eval]': rouge-score and sacrebleu
CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
WORD = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]|[^\W_]+")
ARTICLES = {"a", "an", "the"}


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def token_f1(prediction: str, reference: str) -> float:
    pred = [w for w in words(prediction) if w not in ARTICLES]
    ref = [w for w in words(reference) if w not in ARTICLES]
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def _needs(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"the generate task's ROUGE-L and BLEU need rouge-score and sacrebleu: "
                          f"pip install 'loratune[{EXTRA}]'") from None


class _Words:
    """The tokenizer rouge-score calls."""

    def tokenize(self, text: str) -> list[str]:
        return words(text)


def rouge_l(predictions: list[str], references: list[str]) -> list[float]:
    scorer = _needs("rouge_score.rouge_scorer").RougeScorer(["rougeL"], tokenizer=_Words())
    return [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]


def bleu(predictions: list[str], references: list[str]) -> float:
    sacrebleu = _needs("sacrebleu")
    tokenize = "zh" if any(CJK.search(r) for r in references) else "13a"
    return sacrebleu.corpus_bleu(predictions, [references], tokenize=tokenize).score


def generation_scores(predictions: list[str], references: list[str]) -> tuple[dict, list[dict]]:
    """Corpus metrics and per-item rows."""
    if len(predictions) != len(references) or not references:
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    em = [exact_match(p, r) for p, r in zip(predictions, references)]
    f1 = [token_f1(p, r) for p, r in zip(predictions, references)]
    rl = rouge_l(predictions, references)
    n = len(references)
    metrics = {"exact_match": sum(em) / n, "token_f1": sum(f1) / n, "rouge_l": sum(rl) / n,
               "bleu": bleu(predictions, references)}
    rows = [{"reference": r, "prediction": p, "exact_match": e, "token_f1": round(f, 4),
             "rouge_l": round(g, 4)} for p, r, e, f, g in zip(predictions, references, em, f1, rl)]
    return metrics, rows
