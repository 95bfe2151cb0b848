"""This process's resident memory, for the benchmarks that report it (Linux), and running one
side of a comparison in its own process so that its peak RSS is its own."""

import json
import resource
import subprocess
import sys


def rss_now_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def worker_result(cmd: list[str], worker: str, env: dict | None = None) -> dict:
    """Runs `cmd` (one benchmark side) in a fresh process; returns the JSON object its last
    stdout line prints. Exits with the worker's stderr tail when it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"worker {worker} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
