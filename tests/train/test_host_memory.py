"""Host-memory mode: large blocks come from mmap, so they go back to the OS when freed."""

import subprocess
import sys

import pytest

from loratune.config import build_config
from loratune.train.host_memory import _glibc
from loratune.train.loop import low_host_memory

# Prints how many bytes glibc serves from mmap while a 3 MiB tensor is alive. Freeing one
# 24 MiB block first makes glibc raise its adaptive mmap threshold to 24 MiB, after which a
# 3 MiB block comes from the heap, where fragmentation keeps it resident after free.
PROBE = """
import ctypes, torch
from loratune.train.host_memory import use_mmap_for_large_blocks
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
big = torch.ones(6 * 2**20); del big
if {low}:
    assert use_mmap_for_large_blocks()
before = libc.mallinfo2().hblkhd
block = torch.ones(3 * 2**18)
print(libc.mallinfo2().hblkhd - before)
"""


def _mmapped_bytes(low: bool) -> int:
    code = PROBE.replace("{low}", str(low))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout)


@pytest.mark.skipif(_glibc() is None, reason="glibc-only allocator setting")
def test_low_mode_serves_large_blocks_from_mmap():
    assert _mmapped_bytes(low=False) == 0  # the adaptive default: heap
    assert _mmapped_bytes(low=True) >= 3 * 2**20


def test_auto_mode_is_low_for_qlora_only():
    assert not low_host_memory(build_config({}))
    assert low_host_memory(build_config({"model": {"quantization": {}}}))
    assert low_host_memory(build_config({"train": {"host_memory": "low"}}))
    assert not low_host_memory(build_config({"model": {"quantization": {}},
                                             "train": {"host_memory": "fast"}}))
