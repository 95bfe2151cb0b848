#!/usr/bin/env bash
# Refresh requirements.lock: resolve the newest releases (but scripts/lock-holds.txt) for this
# Python on Linux in a throw-away venv, exactly as scripts/setup.sh installs, and freeze them.
# Run the tests on the new lock before committing it (scripts/setup.sh test && pytest).
#   scripts/lock.sh            the newest releases of everything
#   scripts/lock.sh --add-only keep every locked version; lock only packages new to the project
set -euo pipefail
cd "$(dirname "$0")/.."
holds=scripts/lock-holds.txt
if [ "${1:-}" = "--add-only" ]; then holds=requirements.lock; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
VENV="$tmp/venv" LORATUNE_CONSTRAINTS="$holds" ./scripts/setup.sh test
py=$("$tmp/venv/bin/python" -c 'import platform; print(platform.python_version(), platform.machine())')
{
  echo "# Exact versions scripts/setup.sh installs (runtime and test extras), used as pip constraints."
  echo "# Resolved by scripts/lock.sh on $(date -u +%Y-%m-%d) with Python $py (Linux)."
  echo "# torch is the CPU build (2.13.0+cpu, from this machine's disk)."
  "$tmp/venv/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check \
    | sed -e 's/^torch==\([0-9.]*\)+cpu$/torch==\1/'
} > requirements.lock.tmp
mv requirements.lock.tmp requirements.lock
echo "requirements.lock: $(grep -vc '^#' requirements.lock) packages"
