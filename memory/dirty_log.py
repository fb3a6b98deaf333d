"""The dirty log of live migration: a bitmap the front-end shares, one bit per 4 KiB page.

vhost-user.rst ("Migration", "Dirty pages logging"): while VHOST_F_LOG_ALL is on, the backend
sets bit ``page % 8`` of byte ``page // 8`` of the log for every guest page it writes
(``page = gpa // VHOST_LOG_PAGE``), and QEMU, which reads and clears the log while we run,
sends those pages again. A page written and not marked reaches the destination stale: the
migrated guest reads old data, silently. So every write goes through one choke point
(``memory.write_tracker``: the data of a request, status bytes, GET_ID, and the used ring
stores, which the split ring reports by guest address), and :meth:`DirtyLog.mark` is the hook
the connection installs there.

Atomicity. Linux vhost and libvhost-user set the bits with an atomic OR; Python has no atomic
read-modify-write on shared memory. What we do instead, and why it loses nothing:

- among our own threads (one per queue) a lock makes the load-OR-store of a byte one step,
  so two queues marking the same byte cannot drop each other's bit;
- against QEMU, which takes each 64-bit word of the log with an atomic exchange (read and
  clear), our byte store is one store (``memoryview`` item assignment). If QEMU's exchange
  falls between our load and our store, we store back bits QEMU had already taken: those
  pages are sent once more (harmless), and our new bit is set either way. A bit is never
  cleared by us, so none of QEMU's can be lost.

Mapping. The log comes from SET_LOG_BASE as (fd, mmap size, mmap offset), checked like a memory
region: a sealed or regular file large enough for ``offset + size`` (an access past a file's
end would be SIGBUS, which Python cannot survive), mapped from offset 0 (mmap wants page-aligned
offsets), at most :data:`MAX_LOG_SIZE`. A page past the end of the log is the front-end's
mistake; it is counted (``beyond``) and otherwise ignored, since the data path must not fail
for it.
"""

from __future__ import annotations

import mmap
import os
import stat
import threading
from typing import Final

from memory.errors import GuestMemoryError, GuestMemoryErrorKind
from memory.guest_memory import seal_against_shrinking

VHOST_LOG_PAGE: Final = 4096
MAX_LOG_SIZE: Final = 1 << 30
"""Largest log accepted: 1 GiB of bitmap covers 32 TiB of guest memory."""


class DirtyLog:
    """A mapped dirty log (see the module docstring). :meth:`mark` is thread-safe."""

    def __init__(self, fd: int, mmap_size: int, mmap_offset: int) -> None:
        """Map ``mmap_size`` bytes of ``fd`` from ``mmap_offset``; GuestMemoryError (nothing
        mapped) if the front-end's description does not fit its file. Does not take ``fd``."""
        if not 0 < mmap_size <= MAX_LOG_SIZE:
            raise GuestMemoryError(
                f"dirty log size {mmap_size:#x} is not in 1..{MAX_LOG_SIZE:#x}",
                GuestMemoryErrorKind.INVALID_REGION,
            )
        if not 0 <= mmap_offset <= MAX_LOG_SIZE:
            raise GuestMemoryError(
                f"dirty log offset {mmap_offset:#x} is too large",
                GuestMemoryErrorKind.INVALID_REGION,
            )
        seal_against_shrinking(fd)
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise GuestMemoryError(
                f"dirty log fd: {exc.strerror}", GuestMemoryErrorKind.MAP_FAILED
            ) from None
        end = mmap_offset + mmap_size
        if not stat.S_ISREG(st.st_mode) or st.st_size < end:
            what = f"{st.st_size:#x} bytes" if stat.S_ISREG(st.st_mode) else "not a regular file"
            raise GuestMemoryError(
                f"dirty log {mmap_offset:#x}+{mmap_size:#x} is past the end of its file ({what})",
                GuestMemoryErrorKind.FILE_TOO_SMALL,
            )
        try:
            self._map = mmap.mmap(fd, end, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError) as exc:
            raise GuestMemoryError(
                f"dirty log cannot be mapped: {exc}", GuestMemoryErrorKind.MAP_FAILED
            ) from None
        self._bits = memoryview(self._map)[mmap_offset:end]
        self.size = mmap_size
        self.pages = mmap_size * 8
        """Pages the log covers: guest addresses below ``pages * VHOST_LOG_PAGE``."""
        self.beyond = 0
        """Pages marked past the end of the log (the front-end sized it too small)."""
        self._lock = threading.Lock()
        self._closed = False

    def mark(self, gpa: int, length: int) -> None:
        """``length`` (> 0) bytes at guest address ``gpa`` were written: set their pages."""
        first = gpa // VHOST_LOG_PAGE
        last = (gpa + length - 1) // VHOST_LOG_PAGE
        if last >= self.pages:
            self.beyond += last - max(first, self.pages) + 1
            last = self.pages - 1
            if first > last:
                return
        bits = self._bits
        with self._lock:
            if self._closed:
                return
            page = first
            while page <= last:
                byte, bit = page >> 3, page & 7
                if bit == 0 and last - page >= 7:
                    # A whole byte of pages: one store, no load needed (OR with all ones).
                    bits[byte] = 0xFF
                    page += 8
                    continue
                bits[byte] |= 1 << bit
                page += 1

    def is_dirty(self, gpa: int) -> bool:
        """Whether the page of ``gpa`` is marked (for tests and the front-end side)."""
        page = gpa // VHOST_LOG_PAGE
        return page < self.pages and bool(self._bits[page >> 3] >> (page & 7) & 1)

    def close(self) -> None:
        """Unmap. Idempotent; a mark racing it is dropped."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._bits.release()
            self._map.close()
