"""Hugging Face datasets and data as people keep it (issue 28 item 3): save_to_disk folders,
.arrow files, globs of shards, Hub ids (offline: a one-line error, no network), data.split,
data.columns, data.filter; through build_examples, the text and preference readers, and train()."""

import json
import socket

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from loratune.config import DataConfig, build_config
from loratune.data import DataError, build_examples
from loratune.data.hf_datasets import iter_records
from loratune.data.preference_pairs import build_preference_examples
from loratune.data.text import iter_documents

OURS = [{"instruction": f"Repeat the word {w}", "input": "", "output": f"{w} {w} {w}"}
        for w in ["apple", "river", "stone", "cloud", "green", "metal", "piano", "tiger"]]
# The same records as a dataset on the Hub would name them.
THEIRS = {"question": [r["instruction"] for r in OURS], "answer": [r["output"] for r in OURS],
          "id": list(range(len(OURS)))}
MAPPING = {"question": "instruction", "answer": "output"}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test: these tests never use the network."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def saved(tmp_path, name="ds"):
    """A DatasetDict saved to disk: 'train' holds THEIRS, 'test' its first two records."""
    folder = tmp_path / name
    full = datasets.Dataset.from_dict(THEIRS)
    datasets.DatasetDict({"train": full, "test": full.select([0, 1])}).save_to_disk(str(folder))
    return folder


def jsonl(tmp_path, rows, name="ours.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def ids(examples):
    return [(e.input_ids, e.labels) for e in examples]


def test_saved_dataset_with_columns_trains_like_our_file(tmp_path, smol_tokenizer):
    folder = saved(tmp_path)
    ours, _ = build_examples(jsonl(tmp_path, OURS), smol_tokenizer, DataConfig())
    theirs, stats = build_examples(folder, smol_tokenizer, DataConfig(columns=MAPPING))
    assert stats.n_records == 8 and stats.format == "alpaca"
    assert ids(theirs) == ids(ours)
    test, _ = build_examples(folder, smol_tokenizer, DataConfig(columns=MAPPING, split="test"))
    assert ids(test) == ids(ours[:2])


def test_parquet_file_and_glob_of_shards(tmp_path, smol_tokenizer):
    ours, _ = build_examples(jsonl(tmp_path, OURS), smol_tokenizer, DataConfig())
    shards = tmp_path / "shards"
    shards.mkdir()
    table = pa.table(THEIRS)
    pq.write_table(table.slice(0, 3), shards / "part-0.parquet")
    pq.write_table(table.slice(3, 5), shards / "part-1.parquet")
    cfg = DataConfig(columns=MAPPING)
    single, _ = build_examples(shards / "part-0.parquet", smol_tokenizer, cfg)
    assert ids(single) == ids(ours[:3])
    every, _ = build_examples(str(shards / "*.parquet"), smol_tokenizer, cfg)
    assert ids(every) == ids(ours)
    wheres = [w for w, _ in iter_records(str(shards / "part-*.parquet"), cfg)]
    assert wheres[2:4] == [f"{shards / 'part-0.parquet'}[2]", f"{shards / 'part-1.parquet'}[0]"]


def test_arrow_file(tmp_path, smol_tokenizer):
    folder = tmp_path / "one"
    datasets.Dataset.from_dict(THEIRS).save_to_disk(str(folder))  # a Dataset: no splits
    arrow = next(folder.glob("*.arrow"))
    ours, _ = build_examples(jsonl(tmp_path, OURS), smol_tokenizer, DataConfig())
    got, _ = build_examples(arrow, smol_tokenizer, DataConfig(columns=MAPPING))
    assert ids(got) == ids(ours)
    got, _ = build_examples(folder, smol_tokenizer, DataConfig(columns=MAPPING))
    assert ids(got) == ids(ours)


def test_errors_name_dataset_split_and_column(tmp_path, smol_tokenizer):
    folder = saved(tmp_path)
    with pytest.raises(DataError, match=r"ds: no split 'validation' .*splits: train, test"):
        build_examples(folder, smol_tokenizer, DataConfig(split="validation"))
    with pytest.raises(DataError, match=r"ds \(split train\): no column 'reply' \(data.columns\)"
                       r"; its columns: question, answer, id"):
        build_examples(folder, smol_tokenizer, DataConfig(columns={"reply": "output"}))
    # unmapped: our reader names the record (dataset, split, position) and our field
    with pytest.raises(DataError, match=r"ds \(split train\)\[0\]: .*format"):
        build_examples(folder, smol_tokenizer, DataConfig())
    with pytest.raises(DataError, match=r"part.jsonl:1: no column 'question', 'answer' \(data.columns\)"):
        build_examples(jsonl(tmp_path, OURS, "part.jsonl"), smol_tokenizer,
                       DataConfig(columns=MAPPING))
    with pytest.raises(DataError, match=r"nothing-\*.parquet: no files match"):
        build_examples(str(tmp_path / "nothing-*.parquet"), smol_tokenizer, DataConfig())


def test_hub_id_offline_is_one_line_without_network(tmp_path, monkeypatch, smol_tokenizer):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as err:
        build_examples("nobody-here/no-such-set", smol_tokenizer, DataConfig())
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("nobody-here/no-such-set: not a local file or folder")
    assert "split 'train'" in message and "offline" in message and "local cache" in message
    # a missing file in an existing folder is a missing file, not a Hub id
    (tmp_path / "data").mkdir()
    with pytest.raises(DataError, match="data file not found"):
        build_examples("data/train", smol_tokenizer, DataConfig())


def test_filter_leaves_records_out_and_says_how_many(tmp_path, smol_tokenizer):
    code = tmp_path / "keep.py"
    code.write_text("def short(record):\n    return 'i' in record['output']\n\n"
                    "def bad(record):\n    return 1\n")
    ours, _ = build_examples(jsonl(tmp_path, OURS), smol_tokenizer, DataConfig())
    kept, stats = build_examples(saved(tmp_path), smol_tokenizer,
                                 DataConfig(columns=MAPPING, filter=f"{code}:short"))
    short = [i for i, r in enumerate(OURS) if "i" in r["output"]]
    assert 0 < len(short) < len(OURS)
    assert ids(kept) == [ids(ours)[i] for i in short]
    assert stats.notes == {f"left out by data.filter {code}:short": len(OURS) - len(short)}
    assert f"; note: {len(OURS) - len(short)} records: left out by data.filter" in stats.noted()
    with pytest.raises(DataError, match=r"ds \(split train\)\[0\]: data.filter .*:bad returned "
                       "int; expected True"):
        build_examples(tmp_path / "ds", smol_tokenizer,
                       DataConfig(columns=MAPPING, filter=f"{code}:bad"))
    with pytest.raises(DataError, match="neither path/to/file.py:function nor a valid "
                       "expression|attribute access 'keep.short' is not allowed"):
        build_examples(tmp_path / "ds", smol_tokenizer, DataConfig(filter="keep.short"))


def test_text_and_preference_readers_take_datasets(tmp_path, smol_tokenizer):
    folder = tmp_path / "corpus"
    datasets.Dataset.from_dict({"body": ["one doc", "  ", "two doc"]}).save_to_disk(str(folder))
    cfg = DataConfig(format="text", columns={"body": "text"})
    assert list(iter_documents(folder, cfg)) == [(f"{folder}[0]", "one doc"),
                                                 (f"{folder}[2]", "two doc")]
    pairs = tmp_path / "pairs"
    datasets.Dataset.from_dict({"q": ["Say hi", "Say bye"], "good": ["hi", "bye"],
                                "bad": ["no", "never"]}).save_to_disk(str(pairs))
    cfg = DataConfig(columns={"q": "prompt", "good": "chosen", "bad": "rejected"})
    got, stats = build_preference_examples(pairs, smol_tokenizer, cfg, "pairs")
    plain, _ = build_preference_examples(
        jsonl(tmp_path, [{"prompt": "Say hi", "chosen": "hi", "rejected": "no"},
                         {"prompt": "Say bye", "chosen": "bye", "rejected": "never"}]),
        smol_tokenizer, DataConfig(), "pairs")
    assert stats.n_examples == 2
    assert [(p.prompt, p.chosen, p.rejected) for p in got] == \
        [(p.prompt, p.chosen, p.rejected) for p in plain]


def test_train_on_a_saved_dataset_with_its_test_split(tmp_path, smol_tokenizer, capsys):
    from loratune.train import train
    from tiny import tiny_llama

    folder = saved(tmp_path)
    cfg = build_config({
        "output_dir": str(tmp_path / "run"),
        "adapter": {"r": 4, "lora_alpha": 8, "modules_to_save": ["lm_head"]},
        "data": {"train": str(folder), "eval": str(folder), "columns": MAPPING,
                 "max_length": 64},
        "train": {"max_steps": 30, "batch_size": 4, "lr": 5e-3, "warmup_ratio": 0.0,
                  "eval_every": 30},
    })
    result = train(cfg, model=tiny_llama(vocab=len(smol_tokenizer)), tokenizer=smol_tokenizer)
    lines = capsys.readouterr().out.splitlines()
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0] - 1.0
    assert any(line.startswith("data: 8 examples (alpaca)") and "held-out: 2" in line
               for line in lines)


def test_dashboard_refuses_a_filter_file_outside_the_offered_folders(tmp_path):
    """data.filter runs user code: from the dashboard its file must lie in an offered folder."""
    from loratune.config import RunConfig
    from loratune.ui.confine import Confinement

    data, away = tmp_path / "data", tmp_path / "away"
    data.mkdir()
    (data / "t.jsonl").write_text('{"instruction": "a", "output": "b"}\n')  # launch wants it
    offered = Confinement.of(tmp_path / "runs", [data])

    def run(filter_ref):
        return RunConfig.model_validate({"data": {"train": str(data / "t.jsonl"),
                                                  "filter": filter_ref}})

    assert offered.refusal(run(f"{data}/keep.py:short")) is None
    key, why = offered.refusal(run(f"{away}/keep.py:short"))
    assert key == "data.filter" and str(away) in why
