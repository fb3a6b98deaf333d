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

# The C parts under AddressSanitizer and UBSan: a copy of the tree with both cffi modules built
# with the sanitizers, the twin property test and the hostile batteries (rings, guests, the real
# serve process, which inherits the preloaded runtimes) run against it.
if [ "$#" -eq 0 ]; then
    echo "== pytest (C parts under ASan and UBSan)"
    san=$(mktemp -d)
    tar --exclude=./.venv --exclude=./.git -cf - . | tar -xf - -C "$san"
    py="$PWD/.venv/bin/python"
    src=$PWD
    flags="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
    src_rc=0
    (
        cd "$san"
        export VHOST_USER_CFLAGS="$flags" VHOST_USER_LDFLAGS="-fsanitize=address,undefined"
        "$py" -m blkdev.native.build
        "$py" -m vhost_user.native.build
        ASAN_OPTIONS=detect_leaks=0 \
        LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)" \
            "$py" -m pytest -q -p no:cacheprovider tests/unit/test_fastpath.py \
            tests/protocol/test_hostile_guest.py tests/protocol/test_hostile_e2e.py
    ) || src_rc=$?
    rm -rf "$san"
    cd "$src"
    if [ "$src_rc" -ne 0 ]; then echo "pytest (sanitizers) failed (exit $src_rc)"; rc=$src_rc; fi
fi

echo "== ruff check"
.venv/bin/ruff check . || { echo "ruff failed"; rc=1; }

echo "== mypy"
.venv/bin/mypy || { echo "mypy failed"; rc=1; }

exit "$rc"
