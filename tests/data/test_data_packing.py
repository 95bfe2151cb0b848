"""Packing and batches: rows fit, examples stay apart in attention, order is a function of
(seed, epoch)."""

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from loratune.data import (
    IGNORE,
    DataError,
    Example,
    batches,
    collate,
    encode_conversation,
    epoch_rows,
    pack_examples,
    should_pack,
)


def ex(n: int, start: int = 1, labelled_from: int = 0) -> Example:
    ids = list(range(start, start + n))
    return Example(ids, [IGNORE] * labelled_from + ids[labelled_from:])


def tiny_llama(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).float().eval()


# ---------------------------------------------------------------------------------- packing


def test_first_fit_decreasing():
    exs = [ex(n, start=10 * i) for i, n in enumerate([2, 6, 1, 4, 3, 5, 2, 1])]
    rows = pack_examples(exs, 8)
    # Decreasing: 6 5 4 3 2 2 1 1 -> [6 2] [5 3] [4 2 1 1]; the best possible (24 tokens, 3 rows).
    assert [[len(e) for e in row] for row in rows] == [[6, 2], [5, 3], [4, 2, 1, 1]]
    assert sorted(id(e) for row in rows for e in row) == sorted(id(e) for e in exs)
    # The seed only orders equal lengths: the same row shapes, possibly other examples.
    for seed in range(5):
        assert [[len(e) for e in r] for r in pack_examples(exs, 8, seed)] == [[6, 2], [5, 3],
                                                                               [4, 2, 1, 1]]
    assert pack_examples(exs, 8, seed=3) == pack_examples(exs, 8, seed=3)
    with pytest.raises(DataError, match="example 1 has 6 tokens, more than max_length=5"):
        pack_examples(exs, 5)


def test_packing_many_examples_is_tight():
    rng = random.Random(0)
    exs = [ex(rng.randint(1, 64)) for _ in range(2000)]
    rows = pack_examples(exs, 64)
    assert all(sum(len(e) for e in row) <= 64 for row in rows)
    assert sum(len(row) for row in rows) == 2000
    lower_bound = sum(len(e) for e in exs) / 64
    assert len(rows) <= 1.03 * lower_bound + 1


def test_collate_packed_rows():
    a, b, c = ex(3, 10), ex(4, 20, labelled_from=2), ex(2, 30)
    batch = collate([[a, b], [c]], pad_id=0, packed=True)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask
    assert batch["input_ids"].tolist() == [[10, 11, 12, 20, 21, 22, 23],
                                           [30, 31, 0, 0, 0, 0, 0]]
    # The first token of every example, the prompt part of b and all padding: no label.
    assert batch["labels"].tolist() == [[IGNORE, 11, 12, IGNORE, IGNORE, 22, 23],
                                        [IGNORE, 31, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE]]
    # Positions restart per example, and the trailing padding is a segment of its own.
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3], [0, 1, 0, 1, 2, 3, 4]]


def test_collate_padded_rows():
    eos = 2  # pad == eos: the labels, not the ids, decide what is learned
    a, b = Example([5, 6, eos], [IGNORE, 6, eos]), Example([7, eos], [7, eos])
    batch = collate([[a], [b]], pad_id=eos, packed=False)
    assert batch["input_ids"].tolist() == [[5, 6, eos], [7, eos, eos]]
    assert batch["labels"].tolist() == [[IGNORE, 6, eos], [IGNORE, eos, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2]]
    with pytest.raises(ValueError, match="need packed=True"):
        collate([[a, b]], pad_id=0, packed=False)


def test_packed_row_has_no_cross_contamination(smol_tokenizer):
    tok = smol_tokenizer
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
             for q, a in [("Hi", "Hello!"), ("What is 2+2?", "4"),
                          ("Name a colour.", "Blue, like the sky."), ("Bye", "See you.")]]
    exs = [encode_conversation(c, tok, tok.chat_template, "answers", 128).example for c in convs]
    rows = pack_examples(exs, 96)
    assert [len(r) for r in rows] == [2, 2]  # two examples per row, some padding after
    model = tiny_llama(len(tok))
    batch = collate(rows, tok.pad_token_id, packed=True)
    assert "attention_mask" not in batch
    with torch.no_grad():
        # use_cache=False, as in training: transformers reads packing from position_ids only
        # when no KV cache is in play.
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       use_cache=False).logits
        for r, row in enumerate(rows):
            at = 0
            for e in row:
                alone = model(input_ids=torch.tensor([e.input_ids]), use_cache=False).logits[0]
                torch.testing.assert_close(packed[r, at:at + len(e)], alone, atol=1e-5, rtol=0)
                at += len(e)
        # The check can fail: with running positions and no segments, the second example of a
        # row attends to the first, and its logits move.
        plain = model(input_ids=batch["input_ids"], use_cache=False).logits
        first, second = rows[0]
        alone = model(input_ids=torch.tensor([second.input_ids])).logits[0]
        leaked = plain[0, len(first):len(first) + len(second)]
        assert (leaked - alone).abs().max() > 1e-3


# ---------------------------------------------------------------------------------- batches


def _as_lists(bs):
    return [{k: v.tolist() for k, v in b.items()} for b in bs]


@pytest.mark.parametrize("packing", [True, False])
def test_batches_are_a_function_of_seed_and_epoch(packing):
    rng = random.Random(1)
    exs = [ex(rng.randint(2, 16), start=100 * i) for i in range(40)]
    one = _as_lists(batches(exs, 4, 32, packing, 0, seed=7, epoch=3))
    assert one == _as_lists(batches(list(exs), 4, 32, packing, 0, seed=7, epoch=3))
    assert one != _as_lists(batches(exs, 4, 32, packing, 0, seed=7, epoch=4))
    assert one != _as_lists(batches(exs, 4, 32, packing, 0, seed=8, epoch=3))
    # Every example exactly once per epoch (its first id is unique), and the same number of
    # batches in every epoch, so a step maps to one (epoch, batch) for resuming.
    for epoch in range(3):
        rows = epoch_rows(exs, 32, packing, 7, epoch)
        assert sorted(e.input_ids[0] for row in rows for e in row) == [100 * i for i in range(40)]
        assert len(batches(exs, 4, 32, packing, 0, 7, epoch)) == len(one)
    if packing:
        assert all(len(b["input_ids"][0]) <= 32 for b in one)


def test_should_pack():
    rng = random.Random(0)
    # Lengths close to max_length and to each other: little padding, nothing to pack.
    assert not should_pack([ex(rng.randint(90, 100)) for _ in range(64)], 100, 8)
    # Lengths spread from 1 to max_length: unpacked batches are ~1/3 padding.
    assert should_pack([ex(rng.randint(1, 100)) for _ in range(64)], 100, 8)
    # Short examples: a row holds several of them.
    assert should_pack([ex(20) for _ in range(64)], 100, 8)
    assert not should_pack([ex(20)], 100, 8)
