"""Positional I/O on the image file, with host failures turned into DiskIOError."""

from __future__ import annotations

import os
from collections.abc import Sequence

from blkdev.errors import DiskIOError
from blkdev.fileio import IOV_MAX, preadv_full, pwritev_full


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
        preadv_full(self.fd, vecs, offset, path=self.path, zeros_past_eof=True)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.pwritev([memoryview(data)], offset)

    def pwritev(self, vecs: Sequence[memoryview], offset: int) -> None:
        pwritev_full(self.fd, vecs, offset, path=self.path)

    def sync(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            raise DiskIOError(f"fdatasync of {self.path} failed: {e.strerror}", e.errno) from e

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)
