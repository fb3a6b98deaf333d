"""Positional vectored I/O on an image file: whole transfers, host failures as DiskIOError.

``os.preadv``/``os.pwritev`` may move fewer bytes than asked (a signal, a huge request) and take
at most IOV_MAX vectors, so every disk goes through these loops rather than calling them once.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from typing import Final

from blkdev.errors import DiskIOError

IOV_MAX: Final = 1024
"""Linux's UIO_MAXIOV: the most vectors one preadv/pwritev accepts."""


def advance(vecs: list[memoryview], n: int) -> list[memoryview]:
    """``vecs`` without its first ``n`` bytes."""
    i = 0
    while n and n >= len(vecs[i]):
        n -= len(vecs[i])
        i += 1
    rest = vecs[i:]
    if n:
        rest[0] = rest[0][n:]
    return rest


def preadv_full(
    fd: int, vecs: Sequence[memoryview], offset: int, *, path: str, zeros_past_eof: bool
) -> None:
    """Fill every byte of ``vecs`` from ``offset``. At the end of the file, either the rest
    reads as zeros (``zeros_past_eof``, qcow2's rule for clusters past the file end) or it is
    an error (a raw image that shrank under us)."""
    pending = [v for v in vecs if len(v)]
    while pending:
        try:
            n = os.preadv(fd, pending[:IOV_MAX], offset)
        except OSError as e:
            raise DiskIOError(f"read of {path} failed: {e.strerror}", e.errno) from e
        if n == 0:
            if not zeros_past_eof:
                raise DiskIOError(f"{path} ended at {offset} (was it truncated?)", errno.EIO)
            for v in pending:
                v[:] = bytes(len(v))
            return
        offset += n
        pending = advance(pending, n)


def pwritev_full(fd: int, vecs: Sequence[memoryview], offset: int, *, path: str) -> None:
    """Write every byte of ``vecs`` at ``offset``."""
    pending = [v for v in vecs if len(v)]
    while pending:
        try:
            n = os.pwritev(fd, pending[:IOV_MAX], offset)
        except OSError as e:
            raise DiskIOError(f"write to {path} failed: {e.strerror}", e.errno) from e
        if n == 0:
            raise DiskIOError(f"write to {path} made no progress", errno.EIO)
        offset += n
        pending = advance(pending, n)
