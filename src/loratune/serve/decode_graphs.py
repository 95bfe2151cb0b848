"""The decode step recorded once per shape and replayed (CUDA graphs).

A decode step of a small model is thousands of tiny kernels; launched one by one from Python
the GPU mostly waits. A CUDA graph records the step's kernels once and replays them with one
launch. Shapes must stay fixed, so a step runs padded to a bucket: rows to a power of two
(padding rows feed token 0 at the cache's scratch column on slot 0), attended columns to the
slot cache's power-of-two width. Inputs live in one static buffer refilled in place before
each replay; a graph is recorded again when a tensor it read was replaced (the `version`:
new adapter layers, a larger rank, a grown cache).

Recording happens after warm-up runs on a side stream, and the first replay is compared with
the warm-up's eager result: a mismatch raises GraphError and the engine goes on without
graphs. Off the GPU, `eager_capture` stands in (replay = run the recorded function again), so
the padding and buffer plumbing is tested on CPU.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch

from loratune.serve.slot_cache import bucket

Replay = Callable[[], torch.Tensor]


class GraphError(RuntimeError):
    """Recording a decode step failed or its replay disagreed with the eager step."""


def eager_capture(fn: Callable[[], torch.Tensor], lock: threading.RLock) -> Replay:
    """No recording: every replay runs `fn` again (CPU; tests)."""
    return fn


def cuda_capture(fn: Callable[[], torch.Tensor], lock: threading.RLock) -> Replay:
    """Record `fn` as a CUDA graph; its replay returns the same output tensor, refilled."""
    # Other threads touch adapter slots (unload zeroes a slot) under the pool's lock; none may
    # launch work while a graph is being recorded.
    with lock:
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):              # cuBLAS workspaces, lazy buffers
                    expected = fn().clone()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=_POOL.get(), capture_error_mode="thread_local"):
                out = fn()
            graph.replay()
        except Exception as err:
            raise GraphError(f"recording the decode step failed: {type(err).__name__}: "
                             f"{err}") from err
    if not torch.allclose(out.float(), expected.float(), rtol=1e-2, atol=1e-2):
        gap = (out.float() - expected.float()).abs().max().item()
        raise GraphError(f"the recorded decode step's logits differ from the eager step's "
                         f"by up to {gap:.3g}")

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


class _SharedPool:
    """One memory pool for all of the process's decode graphs (they never run at once)."""

    def __init__(self):
        self.handle = None

    def get(self):
        if self.handle is None:
            self.handle = torch.cuda.graph_pool_handle()
        return self.handle


_POOL = _SharedPool()


class DecodeGraphs:
    """Replays of `forward(ids [R, 1], columns [R], slots [R], shifts [R], width) -> logits
    [R, vocab]`, one per (rows bucket, width); a row's position is its column plus its shift
    (multimodal RoPE after an image: serve/image_rows.py; 0 otherwise)."""

    def __init__(self, forward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor,
                                          torch.Tensor, int], torch.Tensor],
                 max_rows: int, device: torch.device, lock: threading.RLock,
                 capture: Callable[[Callable[[], torch.Tensor], threading.RLock], Replay]):
        self.forward, self.max_rows, self.lock, self.capture = forward, max_rows, lock, capture
        self.static = torch.zeros(4, max_rows, dtype=torch.long, device=device)
        self.replays: dict[tuple[int, int], Replay] = {}
        self.version: tuple | None = None
        self.recorded = 0                        # graphs recorded so far (all versions)

    def __call__(self, ids: list[int], positions: list[int], slots: list[int],
                 shifts: list[int], width: int, scratch: int, version: tuple) -> torch.Tensor:
        """Logits [len(ids), vocab] of one decode step; `scratch` is where padding rows write."""
        if version != self.version:
            self.replays.clear()        # they read tensors that were replaced
            self.version = version
        n = len(ids)
        rows = bucket(n, self.max_rows, smallest=1)
        pad = rows - n
        host = torch.tensor([ids + [0] * pad, positions + [scratch] * pad, slots + [0] * pad,
                             shifts + [0] * pad])
        self.static[:, :rows].copy_(host)
        key = (rows, width)
        replay = self.replays.get(key)
        if replay is None:
            static = self.static

            def step() -> torch.Tensor:
                return self.forward(static[0, :rows, None], static[1, :rows], static[2, :rows],
                                    static[3, :rows], width)

            replay = self.replays[key] = self.capture(step, self.lock)
            self.recorded += 1
        return replay()[:n]
