"""The sandbox escapes re-run through `loratune eval --task code` (tests/eval/escape_cli.py),
judged from outside the command: it exits 0, no problem passes, all end harmless."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.skipif(shutil.which("bwrap") is None,
                    reason="bubblewrap is not installed (apt-get install bubblewrap)")
def test_escapes_through_the_command_line_all_end_harmless(tmp_path):
    script = Path(__file__).with_name("escape_cli.py")
    proc = subprocess.run([sys.executable, str(script), "--keep", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[-1] == "all 15 ended harmless"
    statuses = dict(line.split()[:2] for line in lines[:-1])
    assert statuses["sys_exit_in_function"] == "failed"
    assert statuses["traceback_code"] == statuses["pidfd_kills_the_evaluator"] == "refused"
