"""DiskHandle: a disk the backend can let go of and take back, for live migration's hand-over.

During a migration two backends serve one image, one per QEMU: the source's until its VM stops,
the destination's from when the migrated VM starts. They must never have it open for writing at
the same time (two writers, and a qcow2 image's cached metadata, would corrupt it), so the image
changes hands with the rings:

- the source's rings stop while the front-end logs dirty pages (VHOST_F_LOG_ALL: only a migration
  stops a device so): every request has completed, the disk is flushed and closed, which drops
  its lock (:meth:`DiskHandle.release`);
- the destination (``serve --incoming``) only looked at the image when it started, read-only and
  without a lock (its size and format for the config space); when the migrated guest's first
  ring starts it opens the image for real, which takes the lock and, for qcow2, reads the
  metadata the source wrote back (:meth:`DiskHandle.acquire`). If the source still holds the
  image, the open is retried for :data:`ACQUIRE_TIMEOUT`, then that ring start fails.

A failed migration resumes the source VM: its rings start again and the source takes the image
back the same way. Between release and acquire the handle answers the properties it learnt
(size, format...) and refuses I/O with ValueError (no ring runs then, so none comes).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Final

import structlog

from blkdev.disks.disk import AsyncDisk, Disk
from blkdev.errors import ImageLockedError
from memory import IoBuffers

log = structlog.get_logger(__name__)

ACQUIRE_TIMEOUT: Final = 10.0
"""How long :meth:`DiskHandle.acquire` waits for another process to let go of the image."""
_RETRY_S: Final = 0.05


class DiskHandle:
    """A Disk that :meth:`release` closes and :meth:`acquire` opens again with ``opener``.

    ``disk`` is the disk opened at start (held from the beginning), or, for a migration
    destination, one opened only to look (read-only, unlocked): its properties are kept and it
    is closed at once, and the handle starts released.
    """

    def __init__(
        self,
        opener: Callable[[], Disk],
        disk: Disk,
        *,
        held: bool = True,
        read_only: bool | None = None,
    ) -> None:
        """``read_only``: what the disk ``opener`` opens will be, when ``disk`` (opened only
        to look, so read-only) cannot tell; discard and write-zeroes then follow it, as they
        do for every disk format (both exactly when writable)."""
        self._opener = opener
        self._lock = threading.Lock()
        self.format_name = disk.format_name
        self.network = disk.network
        self.discard_granularity = disk.discard_granularity
        self._read_only = disk.read_only if read_only is None else read_only
        writable = not self._read_only
        self._supports_discard = disk.supports_discard if read_only is None else writable
        self._supports_write_zeroes = disk.supports_write_zeroes if read_only is None else writable
        self._rdev = disk.rdev
        self._size = disk.size
        self.journal_size = disk.journal_size
        # The journal's memory, given again to every disk the handle opens (it outlives them).
        self._journal: memoryview | None = None
        self._disk: Disk | None = disk
        self._closed = False
        if not held:
            disk.close()
            self._disk = None

    # -- the hand-over -----------------------------------------------------------------------

    @property
    def held(self) -> bool:
        return self._disk is not None

    def acquire(self, timeout: float = ACQUIRE_TIMEOUT) -> None:
        """Open the image (a no-op when held); ImageLockedError if another process still has
        it after ``timeout`` seconds, ValueError once closed."""
        with self._lock:
            if self._closed:
                raise ValueError("disk is closed")
            if self._disk is not None:
                return
            deadline = time.monotonic() + timeout
            while True:
                try:
                    disk = self._opener()
                    break
                except ImageLockedError:
                    if time.monotonic() >= deadline:
                        raise
                    time.sleep(_RETRY_S)
            if disk.size != self._size:
                log.info("image size changed while handed over", size=disk.size, was=self._size)
            self._size = disk.size
            self._disk = disk
            if self._journal is not None:
                disk.attach_journal(self._journal)
        log.info("image taken over", format=self.format_name, size=self._size)

    def release(self) -> None:
        """Flush and close the image, which drops its lock (a no-op when released)."""
        with self._lock:
            disk, self._disk = self._disk, None
            if disk is None:
                return
            self._size = disk.size
            disk.close()
        log.info("image handed over: closed until a ring starts again")

    def _current(self) -> Disk:
        disk = self._disk
        if disk is None:
            raise ValueError("the image is handed over (no ring runs)")
        return disk

    # -- Disk --------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        disk = self._disk
        return self._size if disk is None else disk.size

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def supports_discard(self) -> bool:
        return self._supports_discard

    @property
    def supports_write_zeroes(self) -> bool:
        return self._supports_write_zeroes

    @property
    def rdev(self) -> int | None:
        return self._rdev

    def read(self, offset: int, buffers: IoBuffers) -> None:
        self._current().read(offset, buffers)

    def write(self, offset: int, buffers: IoBuffers) -> None:
        self._current().write(offset, buffers)

    @property
    def aio(self) -> AsyncDisk | None:
        disk = self._disk
        return None if disk is None else disk.aio

    def follow_size(self, changed: Callable[[], None]) -> Callable[[], None] | None:
        # Followed on the disk opened now: one a migration hands over and takes back is not
        # followed again (an RBD image resized meanwhile is seen at the next start).
        disk = self._disk
        return None if disk is None else disk.follow_size(changed)

    def fast_target(self) -> tuple[int, int, int] | None:
        disk = self._disk
        return None if disk is None else disk.fast_target()

    @property
    def cached_io(self) -> bool:
        disk = self._disk
        return disk is not None and disk.cached_io

    def read_cached(self, offset: int, buffers: IoBuffers) -> bool:
        return self._current().read_cached(offset, buffers)

    def write_cached(self, offset: int, buffers: IoBuffers) -> bool:
        return self._current().write_cached(offset, buffers)

    def flush(self) -> None:
        disk = self._disk
        if disk is not None:  # released: closing flushed it, nothing is written since
            disk.flush()

    def discard(self, offset: int, length: int) -> None:
        self._current().discard(offset, length)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self._current().write_zeroes(offset, length, unmap)

    def resize(self, new_size: int, *, force: bool = False) -> None:
        self._current().resize(new_size, force=force)

    def refresh_size(self) -> int:
        disk = self._disk
        return self._size if disk is None else disk.refresh_size()

    def attach_journal(self, region: memoryview | None) -> None:
        with self._lock:
            self._journal = region
            disk = self._disk
            if disk is not None:
                disk.attach_journal(region)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._journal = None
            disk, self._disk = self._disk, None
        if disk is not None:
            disk.close()
