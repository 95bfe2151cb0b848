"""data.format: text (continued pretraining): documents from .txt blocks, whole files, record
columns and folders; every token labelled once; documents packed without attending across."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from loratune.config import DataConfig
from loratune.data import IGNORE, DataError, batches, build_examples
from loratune.data.text import iter_documents, split_document
from tiny import tiny_llama

TEXT = "The harbour of Quillmere freezes in spring.\nIts boats wait.\n\n  \n" \
       "Lanterns are lit with whale oil.\r\n\r\nThe end."


def docs(path, **kw):
    return list(iter_documents(path, DataConfig(format="text", **kw)))


def test_txt_blocks_and_whole_files(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(TEXT)
    assert docs(path) == [
        (f"{path}:1", "The harbour of Quillmere freezes in spring.\nIts boats wait."),
        (f"{path}:5", "Lanterns are lit with whale oil."),
        (f"{path}:7", "The end.")]
    assert docs(path, documents="file") == [(str(path), TEXT.replace("\r\n", "\n"))]


def test_records_and_folders(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("one\n\ntwo\n")
    (folder / "sub" / "b.jsonl").write_text(json.dumps({"body": "three", "id": 1}) + "\n")
    pq.write_table(pa.table({"body": ["four", "  "]}), folder / "c.parquet")
    (folder / ".hidden.txt").write_text("never")
    (folder / "notes.bin").write_bytes(b"\x00")
    got = [t for _, t in docs(folder, text_column="body")]
    assert got == ["one", "two", "four", "three"]  # path order: a.txt, c.parquet, sub/b.jsonl
    with pytest.raises(DataError, match=r"c.parquet\[0\]: expected a string field 'text'.*"
                                        r"got nothing; fields: \['body'\]"):
        docs(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty: no .txt, .md, .jsonl"):
        docs(empty)
    with pytest.raises(DataError, match="data file not found"):
        docs(tmp_path / "missing.txt")


def test_pieces_label_every_token_once():
    ids = list(range(1, 12))  # 11 tokens
    pieces = split_document(ids, 4)
    assert [p.input_ids for p in pieces] == [[1, 2, 3, 4], [4, 5, 6, 7], [7, 8, 9, 10],
                                             [10, 11]]
    labelled = [t for p in pieces for t in p.labels if t != IGNORE]
    assert labelled == ids[1:]
    assert [p.input_ids for p in split_document(ids[:4], 4)] == [ids[:4]]
    assert [p.input_ids for p in split_document(ids[:5], 4)] == [ids[:4], ids[3:5]]


def test_build_examples_text(tmp_path, smol_tokenizer):
    tok = smol_tokenizer
    path = tmp_path / "c.txt"
    long = " ".join(f"word{i}" for i in range(60))
    path.write_text(f"Short one.\n\n{long}\n\nAnother short document.\n")
    cfg = DataConfig(format="text", max_length=32)
    examples, stats = build_examples(path, tok, cfg)
    assert stats.format == "text" and stats.n_records == 3
    assert all(len(e) <= 32 for e in examples) and len(examples) > 3
    assert "1 records: split into pieces of data.max_length=32" in stats.noted()
    # every document ends with EOS, labelled; every token but a document's first has a label
    ends = [e for e in examples if e.input_ids[-1] == tok.eos_token_id]
    assert len(ends) == 3 and all(e.labels[-1] == tok.eos_token_id for e in ends)
    short = tok("Short one.", add_special_tokens=True)["input_ids"] + [tok.eos_token_id]
    assert examples[0].input_ids == short and examples[0].labels == [IGNORE, *short[1:]]
    labelled = sum(len(tok(t)["input_ids"]) for t in ["Short one.", long, "Another short document."])
    assert stats.n_label_tokens == labelled  # + EOS, - the first token, per document
    # each continuation piece repeats one token as its context
    assert stats.n_tokens == labelled + 3 + (len(examples) - 3)
    with pytest.raises(DataError, match="holds documents, not conversations"):
        from loratune.data import load_conversations
        load_conversations(path, cfg)


def test_documents_share_rows_without_attending_across(tmp_path, smol_tokenizer):
    tok = smol_tokenizer
    path = tmp_path / "c.txt"
    path.write_text("\n\n".join(["Ravens nest in the clock tower.", "Salt is traded for silk.",
                                 "The river bends twice.", "Nobody counts the bells."]))
    examples, _ = build_examples(path, tok, DataConfig(format="text", max_length=64))
    (batch,) = batches(examples, 8, 64, packing=True, pad_id=tok.pad_token_id, seed=0, epoch=0)
    assert batch["input_ids"].shape[0] == 1  # four documents, one row
    model = tiny_llama(vocab=len(tok))
    model.config._attn_implementation = "sdpa"
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       use_cache=False).logits[0]
        starts = (batch["position_ids"][0] == 0).nonzero()[:, 0].tolist()
        for at, end in zip(starts, starts[1:]):
            alone = model(input_ids=batch["input_ids"][:, at:end], use_cache=False).logits[0]
            torch.testing.assert_close(packed[at:end], alone, atol=1e-5, rtol=0)
