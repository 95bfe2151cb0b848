"""Streamed safetensors reader/writer, checked against the safetensors package both ways."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from loratune.export.merge import plan_shards
from loratune.export.safetensors_io import StreamWriter, read_index, read_tensor

TENSORS = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16),
           "c": torch.arange(6, dtype=torch.int64).reshape(2, 3), "d": torch.zeros(0, 4),
           "e": torch.randn(2, 2).half()}


def test_reads_what_safetensors_writes(tmp_path):
    save_file(TENSORS, str(tmp_path / "x.safetensors"))
    index = read_index(tmp_path)
    assert set(index) == set(TENSORS)
    for name, ref in TENSORS.items():
        got = read_tensor(index[name])
        assert got.dtype == ref.dtype and torch.equal(got, ref), name


def test_safetensors_reads_what_we_write(tmp_path):
    plan = [(k, v.dtype, tuple(v.shape)) for k, v in TENSORS.items()]
    w = StreamWriter(tmp_path / "y.safetensors", plan)
    for k, v in TENSORS.items():
        w.write(k, v)
    w.close()
    back = load_file(str(tmp_path / "y.safetensors"))
    for k, v in TENSORS.items():
        assert torch.equal(back[k], v), k


def test_writer_and_reader_catch_mistakes(tmp_path):
    w = StreamWriter(tmp_path / "z.safetensors", [("a", torch.float32, (3, 5))])
    with pytest.raises(ValueError, match=r"writing a torch.float16 \(3, 5\), but the header "
                                         "declared"):
        w.write("a", torch.zeros(3, 5).half())
    with pytest.raises(ValueError, match="1 declared tensors not written"):
        w.close()
    w.file.close()
    short = tmp_path / "short"
    short.mkdir()
    save_file({"a": torch.randn(100)}, str(short / "t.safetensors"))
    data = (short / "t.safetensors").read_bytes()
    entry = read_index(short)["a"]
    (short / "t.safetensors").write_bytes(data[:-40])  # cut after it was indexed
    with pytest.raises(ValueError, match="file ends inside a tensor"):
        read_tensor(entry)
    with pytest.raises(ValueError, match="t.safetensors: not a readable safetensors file .*"
                                         "truncated or damaged"):
        read_index(short)  # cut before: named at once, not halfway through a merge
    (short / "t.safetensors").write_bytes(b"abc")
    with pytest.raises(ValueError, match="t.safetensors: not a readable safetensors file"):
        read_index(short)


def test_shards_respect_the_limit():
    plan = [(f"t{i}", torch.float32, (10,)) for i in range(7)]  # 40 bytes each
    shards = plan_shards(plan, 100)
    assert [len(s) for s in shards] == [2, 2, 2, 1]
    assert [len(s) for s in plan_shards([("big", torch.float32, (100,))] + plan[:1], 100)] == [1, 1]
