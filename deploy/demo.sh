#!/usr/bin/env bash
# Set up (idempotent), then run the end-to-end demo. Extra arguments go to the demo
# (e.g. --verbose, --backend qsd, --keep).
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
exec .venv/bin/python -m deploy.demo "$@"
