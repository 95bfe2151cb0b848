#!/usr/bin/env bash
# Install the newest releases (no lock, no holds) in a throw-away venv and run the fast tests:
# what a user who `pip install`s loratune today gets. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
VENV="$tmp/venv" LORATUNE_CONSTRAINTS= ./scripts/setup.sh test
"$tmp/venv/bin/python" -m pip list --disable-pip-version-check 2>/dev/null \
  | grep -iE '^(torch|transformers|peft|bitsandbytes|accelerate|safetensors|gguf|fastapi) '
"$tmp/venv/bin/python" -m pytest -q -m "not slow and not llamacpp" "$@"
