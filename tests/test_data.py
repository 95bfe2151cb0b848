import json

import pandas as pd
import pytest
import torch

from loratune.config import DataConfig
from loratune.data import (
    IGNORE,
    TEMPLATES,
    DataError,
    Example,
    batches,
    build_examples,
    collate,
    encode_conversation,
    load_conversations,
    pack_examples,
    read_records,
    resolve_template,
    split_heldout,
    to_messages,
)
from tiny import tiny_llama

ALPACA = {"instruction": "Add", "input": "2 and 3", "output": "5", "system": "Be brief.",
          "history": [["hi", "hello"]]}


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def test_formats_become_messages():
    msgs = to_messages(ALPACA, "auto")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert msgs[3]["content"] == "Add\n\n2 and 3" and msgs[4]["content"] == "5"
    share = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    assert to_messages(share, "auto") == [{"role": "user", "content": "q"},
                                          {"role": "assistant", "content": "a"}]
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert to_messages(chat, "auto", system_prompt="S")[0] == {"role": "system", "content": "S"}


def test_errors_name_file_line_and_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "a", oops}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:3: malformed JSON"):
        read_records(path)
    _write_jsonl(path, [{"instruction": "a", "output": "b"}, {"instruction": "a"}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: missing required field 'output'"):
        load_conversations(path, DataConfig())
    _write_jsonl(path, [{"messages": [{"role": "robot", "content": "x"}]}])
    with pytest.raises(DataError, match=r"messages\[0\]\.role is 'robot'"):
        load_conversations(path, DataConfig())
    _write_jsonl(path, [{"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(DataError, match="must end with an assistant turn"):
        load_conversations(path, DataConfig())
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        read_records(tmp_path / "e.jsonl")


def test_csv_parquet_json(tmp_path):
    rows = [{"instruction": "a", "input": "", "output": "b"},
            {"instruction": "c", "input": "d", "output": "e"}]
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps({"data": rows}))
    for name in ("d.csv", "d.parquet", "d.json"):
        convs = load_conversations(tmp_path / name, DataConfig())
        assert convs[1][-2]["content"] == "c\n\nd" and convs[0][-2]["content"] == "a"
    pd.DataFrame([{"instruction": "a", "input": ""}]).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match=r"bad\.csv:2: missing required field 'output'"):
        load_conversations(tmp_path / "bad.csv", DataConfig())


def _taught(tok, ex):
    return tok.decode([t for t, l in zip(ex.input_ids, ex.labels) if l != IGNORE])


def test_answer_only_labels_with_eos(smol_tokenizer):
    tok = smol_tokenizer
    assert tok.pad_token_id == tok.eos_token_id  # the case where masking pad would drop eos
    msgs = to_messages(ALPACA, "alpaca")
    ex, cut = encode_conversation(msgs, tok, resolve_template(tok, None), "answers", 512)
    assert not cut
    assert _taught(tok, ex) == "hello<|im_end|>5<|im_end|>"
    taught = [label for label in ex.labels if label != IGNORE]
    assert taught[-1] == tok.eos_token_id
    everything, _ = encode_conversation(msgs, tok, resolve_template(tok, None), "all", 512)
    assert everything.labels == everything.input_ids


def test_named_template_for_tokenizer_without_one(smol_tokenizer):
    import copy

    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = None
    with pytest.raises(DataError, match="no chat template.*chatml"):
        resolve_template(tok, None)
    with pytest.raises(DataError, match="unknown chat template 'nope'"):
        resolve_template(tok, "nope")
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    ex, _ = encode_conversation(msgs, tok, TEMPLATES["alpaca"], "answers", 64)
    assert _taught(tok, ex) == "Yo<|im_end|>"
    ex, _ = encode_conversation(msgs, tok, TEMPLATES["zephyr"], "answers", 64)
    assert _taught(tok, ex) == "Yo<|im_end|>"


def test_truncate_or_drop_counted(tmp_path, smol_tokenizer):
    long = {"instruction": "word " * 80, "output": "ok"}
    path = _write_jsonl(tmp_path / "d.jsonl", [long, {"instruction": "hi", "output": "ok"}])
    ex, stats = build_examples(path, smol_tokenizer, DataConfig(max_length=200))
    assert stats.n_truncated == 0 and stats.n_examples == 2
    long2 = {"instruction": "hi", "output": "word " * 300}
    _write_jsonl(path, [long2, {"instruction": "hi", "output": "ok"}])
    ex, stats = build_examples(path, smol_tokenizer, DataConfig(max_length=64))
    assert stats.n_truncated == 1 and max(len(e) for e in ex) == 64
    ex, stats = build_examples(path, smol_tokenizer, DataConfig(max_length=64, overflow="drop"))
    assert stats.n_dropped == 1 and stats.n_examples == 1
    _write_jsonl(path, [long])  # the answer lies past max_length: nothing left to learn
    with pytest.raises(DataError, match="no usable examples"):
        build_examples(path, smol_tokenizer, DataConfig(max_length=32))


def _ex(n, start):
    ids = list(range(start, start + n))
    return Example(ids, ids)


def test_packing_has_no_cross_contamination():
    model = tiny_llama()
    model.config._attn_implementation = "sdpa"
    exs = [_ex(7, 3), _ex(5, 40), _ex(9, 70)]
    packed = collate([exs], pad_id=0, packed=True)
    assert "attention_mask" not in packed
    assert packed["position_ids"][0].tolist() == list(range(7)) + list(range(5)) + list(range(9))
    assert packed["labels"][0, 7].item() == IGNORE and packed["labels"][0, 12].item() == IGNORE
    with torch.no_grad():
        # use_cache=False as in training: transformers only reads packing from position_ids
        # when no KV cache is in play.
        together = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                         use_cache=False).logits[0]
        at = 0
        for ex in exs:
            alone = model(input_ids=torch.tensor([ex.input_ids])).logits[0]
            torch.testing.assert_close(together[at:at + len(ex)], alone, atol=1e-5, rtol=1e-5)
            at += len(ex)


def test_padded_rows_and_batch_order():
    exs = [_ex(n, 1) for n in (3, 9, 5, 2, 8, 4, 6, 7)]
    padded = collate([[exs[0]], [exs[1]]], pad_id=0, packed=False)
    assert padded["attention_mask"].tolist()[0] == [1] * 3 + [0] * 6
    assert padded["labels"][0, 3:].eq(IGNORE).all()
    rows = pack_examples(exs, 12)
    assert all(sum(len(e) for e in r) <= 12 for r in rows) and sum(len(r) for r in rows) == 8
    a = batches(exs, 2, 12, True, 0, seed=1, epoch=0)
    b = batches(exs, 2, 12, True, 0, seed=1, epoch=0)
    c = batches(exs, 2, 12, True, 0, seed=1, epoch=1)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert [x["input_ids"].tolist() for x in a] != [x["input_ids"].tolist() for x in c]


def test_split_heldout_deterministic():
    train, held = split_heldout(list(range(20)), 0.25, seed=3)
    assert len(held) == 5 and not set(train) & set(held)
    assert split_heldout(list(range(20)), 0.25, seed=3) == (train, held)
