"""Read and write safetensors one tensor at a time, with plain file reads and writes.

Memory-mapping a checkpoint (as `safe_open` does) leaves every page read resident in the
process, so a full pass costs the file's size in RSS; `pread` into a fresh buffer does not.
Writing knows every tensor's shape and dtype beforehand, so the header goes first and each
tensor is appended as soon as it is ready: no shard is ever held in memory.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from loratune.models.mxfp4 import check_mxfp4, dequantize_mxfp4, mxfp4_params, mxfp4_shape
from loratune.readers import check_safetensors

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class Entry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_index(folder: Path) -> dict[str, Entry]:
    """Every tensor of every *.safetensors file in `folder`, by name, in file order."""
    index: dict[str, Entry] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        check_safetensors(path)  # a cut or garbled file is named now, not halfway through a merge
        with open(path, "rb") as f:
            try:
                (length,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(length))
            except (struct.error, ValueError) as err:
                raise ValueError(f"{path}: not a safetensors file (bad header: {err})") from None
        base = 8 + length
        header.pop("__metadata__", None)
        for name, meta in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if meta["dtype"] not in DTYPES:
                raise ValueError(f"{path}: tensor {name} has dtype {meta['dtype']}, which this "
                                 f"reader does not handle ({', '.join(DTYPES)})")
            start, end = meta["data_offsets"]
            index[name] = Entry(path, DTYPES[meta["dtype"]], tuple(meta["shape"]),
                                base + start, base + end)
    return index


@dataclass(frozen=True)
class Mxfp4Entry:
    """A fused experts parameter stored as MXFP4 blocks and scales (GPT-OSS), read decoded."""

    blocks: Entry
    scales: Entry
    dtype: torch.dtype = torch.bfloat16
    where: str = "MXFP4"  # file and parameter, for errors

    @property
    def shape(self) -> tuple[int, ...]:
        return mxfp4_shape(self.blocks.shape)


def decoded_index(index: dict[str, Entry], where: str) -> dict[str, Entry | Mxfp4Entry]:
    """`index` with each MXFP4 blocks/scales pair replaced by the parameter they encode, at the
    blocks' place (models/mxfp4.py)."""
    params = mxfp4_params(index, where)
    pairs = {blocks: (param, scales) for param, (blocks, scales) in params.items()}
    read_with_blocks = {scales for _, scales in params.values()}
    out: dict[str, Entry | Mxfp4Entry] = {}
    for name, entry in index.items():
        if name in pairs:
            param, scales = pairs[name]
            check_mxfp4(entry, index[scales], f"{entry.file}: {param}")
            out[param] = Mxfp4Entry(entry, index[scales], where=f"{entry.file}: {param}")
        elif name not in read_with_blocks:
            out[name] = entry
    return out


def read_tensor(entry: Entry | Mxfp4Entry) -> torch.Tensor:
    if isinstance(entry, Mxfp4Entry):
        return dequantize_mxfp4(read_tensor(entry.blocks), read_tensor(entry.scales),
                                entry.dtype, entry.where)
    buf = bytearray(entry.nbytes)
    with open(entry.file, "rb") as f:
        view, done = memoryview(buf), 0
        while done < entry.nbytes:
            n = os.preadv(f.fileno(), [view[done:]], entry.start + done)
            if n <= 0:
                raise ValueError(f"{entry.file}: file ends inside a tensor (truncated?)")
            done += n
    if not entry.nbytes:
        return torch.empty(entry.shape, dtype=entry.dtype)
    return torch.frombuffer(buf, dtype=entry.dtype).reshape(entry.shape)


class StreamWriter:
    """One safetensors file whose tensors (names, dtypes, shapes) are declared up front."""

    def __init__(self, path: Path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        self.expected = []
        for name, dtype, shape in plan:
            n = torch.empty((), dtype=dtype).element_size()
            for d in shape:
                n *= d
            header[name] = {"dtype": NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + n]}
            self.expected.append((name, dtype, tuple(shape)))
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # tensors start 8-byte aligned
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(raw)) + raw)
        self.position = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want = self.expected[self.position]
        if (name, tensor.dtype, tuple(tensor.shape)) != want:
            raise ValueError(f"writing {name} {tensor.dtype} {tuple(tensor.shape)}, but the "
                             f"header declared {want} next")
        if tensor.numel():
            self.file.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
        self.position += 1

    def close(self) -> None:
        if self.position != len(self.expected):
            raise ValueError(f"{len(self.expected) - self.position} declared tensors not written")
        self.file.close()
