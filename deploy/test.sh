#!/usr/bin/env bash
# Set up (idempotent), then run every test (unit, protocol, integration), ruff and mypy.
# Any failure fails the run; pytest's exit 5 (no tests collected) counts as a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh

rc=0
echo "== pytest"
.venv/bin/python -m pytest -q "$@" || rc=$?
if [ "$rc" -ne 0 ]; then echo "pytest failed (exit $rc)"; fi

echo "== ruff check"
.venv/bin/ruff check . || { echo "ruff failed"; rc=1; }

echo "== mypy"
.venv/bin/mypy || { echo "mypy failed"; rc=1; }

exit "$rc"
