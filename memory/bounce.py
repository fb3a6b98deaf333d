"""Page-aligned scratch memory for I/O that cannot go straight to guest pages.

OpenVMM's ``scsi_buffers::BounceBuffer``: when a request's buffers do not meet O_DIRECT's
alignment (or the data must be transformed), a disk reads or writes through this, then copies
to or from the guest with the request's writer or reader. The memory comes from an anonymous
mmap, so it is page-aligned (hence sector-aligned) and zeroed.
"""

from __future__ import annotations

import mmap

from memory.guest_memory import PAGE_SIZE


class BounceBuffer:
    """``size`` zeroed bytes starting on a page boundary."""

    __slots__ = ("_mm", "_size", "_view")

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError(f"negative bounce buffer size {size}")
        pages = max(1, -(-size // PAGE_SIZE))
        self._mm = mmap.mmap(-1, pages * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._size = size
        self._view = memoryview(self._mm)[:size]

    def __len__(self) -> int:
        return self._size

    def as_mut_bytes(self) -> memoryview:
        """The buffer, writable, exactly ``size`` bytes."""
        return self._view

    def io_vecs(self) -> list[memoryview]:
        """The buffer as a one-element iovec list for ``os.preadv``/``os.pwritev``."""
        return [self._view]
