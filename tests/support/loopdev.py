"""A real loop device over a file, detached afterwards (``losetup``; the tests run as root)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def loop_device(backing: Path) -> Iterator[str]:
    """Attach ``backing`` to a free loop device; yields its path (``/dev/loopN``)."""
    dev = subprocess.run(
        ["losetup", "--find", "--show", str(backing)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False, timeout=30)
