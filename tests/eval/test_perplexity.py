"""`perplexity`: exact for a unigram model; sliding windows score each token once."""

import json
import math

import pytest
import torch

from loratune.config.commands import EvalCommandConfig
from loratune.data import DataError
from loratune.eval.run import run_eval
from loratune.eval.tasks import perplexity
from loratune.eval.tasks.perplexity import windows
from tiny import tiny_llama, unigram_llama

APPLE, NO = 11977, 787


def test_unigram_perplexity_by_hand(tmp_path, smol_tokenizer):
    """" apple apple no" after the start token: log p = 2 lp(apple) + lp(no), 3 tokens."""
    text = tmp_path / "t.txt"
    text.write_text(" apple apple no")
    model = unigram_llama({APPLE: 2.0}, len(smol_tokenizer))
    result = run_eval(EvalCommandConfig(task="perplexity", data=str(text)), model,
                      smol_tokenizer).variants[0].result
    other = -math.log(math.exp(2) + len(smol_tokenizer) - 1)
    nll = -(2 * (2 + other) + other)
    assert result.metrics["tokens"] == 3
    assert result.metrics["perplexity"] == pytest.approx(math.exp(nll / 3), rel=1e-4)  # fp32
    assert result.metrics["bits_per_byte"] == pytest.approx(nll / math.log(2) / 15, rel=1e-4)


def test_windows_cover_every_token_once():
    for n, size, stride in [(10, 4, 2), (10, 4, 3), (9, 4, 1), (3, 8, 4), (100, 16, 15)]:
        spans = windows(n, size, stride)
        scored = [t for _, end, first in spans for t in range(first, end)]
        assert scored == list(range(1, n))
        assert all(end - begin <= size and first > begin for begin, end, first in spans)
        # every scored token sees at least size - stride tokens before it (or all of them)
        assert all(first - begin >= min(size - stride, first) for begin, _, first in spans)
    with pytest.raises(ValueError, match=r"stride \(--stride\) 4 must be smaller than the "):
        windows(10, 4, 4)


def nll_by_hand(model, ids, size, stride):
    """Token by token: the window the token falls in, run alone."""
    total = 0.0
    for begin, end, first in windows(len(ids), size, stride):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids[begin:end]])).logits[0], -1)
        total -= sum(logp[t - 1 - begin, ids[t]].item() for t in range(first, end))
    return total


def test_sliding_windows_equal_a_forward_per_window(tmp_path, smol_tokenizer):
    model = tiny_llama(vocab=len(smol_tokenizer))
    docs = ["one two three four five six seven eight nine ten eleven twelve " * 3,
            "a short one"]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    results = {}
    for size, stride in [(16, 8), (16, 15), (128, 64)]:
        cfg = EvalCommandConfig(task="perplexity", data=str(data), max_length=size,
                                stride=stride, batch_size=3)
        result = perplexity.score(model, smol_tokenizer, perplexity.read(cfg), cfg)
        ids = [[smol_tokenizer.bos_token_id, *smol_tokenizer(t)["input_ids"]] for t in docs]
        want = sum(nll_by_hand(model, i, size, stride) for i in ids)
        tokens = sum(len(i) - 1 for i in ids)
        assert result.metrics["tokens"] == tokens
        assert result.metrics["nll_per_token"] == pytest.approx(want / tokens, rel=1e-5)
        results[size, stride] = result.metrics["nll_per_token"]
    assert len({round(v, 6) for v in results.values()}) == 3  # context changes the score


def test_records_without_text_are_named(tmp_path, smol_tokenizer):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match=rf"{data}:2: expected a string field 'text'"):
        perplexity.read(EvalCommandConfig(task="perplexity", data=str(data)))
