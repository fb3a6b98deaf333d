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

# The twin: the protocol suite again (the real serve process, hostile front-ends and guests,
# a real QEMU) with every request served in Python, as on a host where the C data plane is
# not built. The run above used the default, the C data plane.
if [ "$#" -eq 0 ]; then
    echo "== pytest (protocol, --data-plane python)"
    prc=0
    VHOST_USER_BLK_DATA_PLANE=python .venv/bin/python -m pytest -q tests/protocol || prc=$?
    if [ "$prc" -ne 0 ]; then echo "pytest (python data plane) failed (exit $prc)"; rc=$prc; fi
fi

echo "== ruff check"
.venv/bin/ruff check . || { echo "ruff failed"; rc=1; }

echo "== mypy"
.venv/bin/mypy || { echo "mypy failed"; rc=1; }

exit "$rc"
