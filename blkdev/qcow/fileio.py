"""Positional I/O on the image file, with host failures turned into DiskIOError."""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from typing import Final

from blkdev.errors import DiskIOError

IOV_MAX: Final = 1024


def _advance(vecs: list[memoryview], n: int) -> list[memoryview]:
    i = 0
    while n and n >= len(vecs[i]):
        n -= len(vecs[i])
        i += 1
    rest = vecs[i:]
    if n:
        rest[0] = rest[0][n:]
    return rest


class ImageFile:
    """An open image file descriptor (owned: :meth:`close` closes it)."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path

    def size(self) -> int:
        try:
            # lseek rather than fstat: it also gives the size of a block device.
            return os.lseek(self.fd, 0, os.SEEK_END)
        except OSError as e:
            raise DiskIOError(f"stat of {self.path} failed: {e.strerror}", e.errno) from e

    def pread(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``; bytes past the end of the file read as zeros (as
        QEMU's file driver returns them)."""
        buf = bytearray(length)
        self.preadv([memoryview(buf)], offset)
        return bytes(buf)

    def preadv(self, vecs: Sequence[memoryview], offset: int, length: int = -1) -> None:
        """Fill ``vecs`` (``length`` bytes, if the caller knows) from ``offset``; what lies
        past the end of the file reads as zeros."""
        if length > 0 and len(vecs) <= IOV_MAX:
            try:
                if os.preadv(self.fd, vecs, offset) == length:
                    return
            except OSError as e:
                raise DiskIOError(f"read of {self.path} failed: {e.strerror}", e.errno) from e
        pending = [v for v in vecs if len(v)]
        while pending:
            try:
                n = os.preadv(self.fd, pending[:IOV_MAX], offset)
            except OSError as e:
                raise DiskIOError(f"read of {self.path} failed: {e.strerror}", e.errno) from e
            if n == 0:
                for v in pending:
                    v[:] = bytes(len(v))
                return
            offset += n
            pending = _advance(pending, n)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.pwritev([memoryview(data)], offset)

    def pwritev(self, vecs: Sequence[memoryview], offset: int) -> None:
        pending = [v for v in vecs if len(v)]
        while pending:
            try:
                n = os.pwritev(self.fd, pending[:IOV_MAX], offset)
            except OSError as e:
                raise DiskIOError(f"write to {self.path} failed: {e.strerror}", e.errno) from e
            if n == 0:
                raise DiskIOError(f"write to {self.path} made no progress", errno.EIO)
            offset += n
            pending = _advance(pending, n)

    def sync(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            raise DiskIOError(f"fdatasync of {self.path} failed: {e.strerror}", e.errno) from e

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)
