"""Named places in a GRPO step where a test can hold the process and kill it from outside.

`LORATUNE_STOP_AT=rollout:3` (a point's name and a 1-based step): the first time step 3
passes the point `rollout`, the process writes the file named by `LORATUNE_STOP_MARKER` and
waits there until it is killed, so a test knows exactly where the run is when it sends SIGKILL
(tests/train/test_rl_kill_resume.py), with no sleep guessing how far it got. Points: `rollout`
(inside the decode loop, after a token was sampled for every row) and `update` (after a
micro-batch's backward, before the optimizer step). Unset, as in every ordinary run, a point
costs one environment lookup.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

STOP_AT = "LORATUNE_STOP_AT"
MARKER = "LORATUNE_STOP_MARKER"
_state = {"step": 0}


def begin_step(step: int) -> None:
    """The 1-based step that the points passed from now on belong to."""
    _state["step"] = step


def stop_point(name: str) -> None:
    """Hold here if LORATUNE_STOP_AT names this point and the current step."""
    wanted = os.environ.get(STOP_AT)
    if not wanted or wanted != f"{name}:{_state['step']}":
        return
    os.environ.pop(STOP_AT)  # once: a resumed run in this process would pass it again
    marker = os.environ.get(MARKER)
    if marker:
        Path(marker).write_text(wanted)
    hold(wanted)


def hold(where: str) -> None:
    """Wait to be killed (a test may replace this to raise instead)."""
    while True:
        time.sleep(60)
