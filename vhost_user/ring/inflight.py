"""Inflight I/O tracking for split virtqueues (vhost-user.rst, "Inflight I/O tracking").

A backend that dies (kill -9, a crash, an upgrade) with requests popped from the avail ring and
not yet returned in the used ring would lose them: QEMU, reconnecting, can only say where the
used ring is. So the backend keeps, in a shared-memory area that outlives it (QEMU holds the
fd and hands it to the next backend with SET_INFLIGHT_FD), which descriptor chains are in
flight and in what order they were popped. The layout is the backend's own (QEMU only stores
the fd); we follow the one the spec describes, per queue::

    u64 features        0
    u16 version         1
    u16 desc_num        entries below (the queue size)
    u16 last_batch_head the head of the last used entry being published
    u16 used_idx        used->idx once that publication is complete
    desc[desc_num] of 16 bytes:
        u8 inflight     1 from pop until the used entry is published
        u8 padding[5]
        u16 next        (batching; unused: we publish one entry at a time)
        u64 counter     pop order

Order of stores (single stores of the field's width, this file's mapping only):

- pop: ``counter`` then ``inflight = 1``, before the request is served;
- push: ``last_batch_head = head``, then the used element and used->idx (the ring's), then
  ``inflight = 0`` and ``used_idx``.

Recovery, when a ring starts on an area that has seen service (:meth:`QueueInflight.recover`):
a ``used_idx`` behind used->idx means the process died between publishing an entry and
clearing its flag, so the entry of ``last_batch_head`` is cleared and ``used_idx`` caught up;
then every entry still in flight is resubmitted once, in ``counter`` order, and the next avail
index is used->idx plus their number (what SET_VRING_BASE cannot know after a crash).

After the queues' regions, on a page boundary, the device may keep state of its own that must
outlive the process the same way (``VhostUserDevice.inflight_state_size``: a qcow2 disk's
journal of completed, unflushed metadata, ``blkdev.disks.qcow.journal``). QEMU sizes nothing
itself: it maps the ``mmap_size`` we answer GET_INFLIGHT_FD with and hands it all back.

An area the front-end hands over is checked like any shared memory: sealed against shrinking
when it can be, large enough for the queues it claims, mapped whole; contents are not trusted
(a head past the queue, a version we do not know, are reset rather than followed).
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
from typing import Final

from memory.guest_memory import seal_against_shrinking

VERSION: Final = 1
HEADER: Final = struct.Struct("<QHHHH")
"""features, version, desc_num, last_batch_head, used_idx (16 bytes)."""
DESC: Final = struct.Struct("<B5xHQ")
"""inflight, padding, next, counter (16 bytes)."""
ALIGN: Final = 64
MAX_AREA: Final = 64 << 20
PAGE: Final = 4096


class InflightError(Exception):
    """The area the front-end gave does not fit what it claims (the connection blames it)."""


def queue_region_size(queue_size: int) -> int:
    """Bytes of one queue's region, aligned so that each starts on a cache line."""
    raw = HEADER.size + DESC.size * queue_size
    return (raw + ALIGN - 1) // ALIGN * ALIGN


def state_offset(num_queues: int, queue_size: int) -> int:
    """Where the device's own region starts, after every queue's, on a page boundary."""
    return (num_queues * queue_region_size(queue_size) + PAGE - 1) // PAGE * PAGE


class QueueInflight:
    """One queue's region. Offsets are in u16/u64 items of the shared views."""

    def __init__(self, area: InflightArea, offset: int, desc_num: int) -> None:
        self._bytes = area.view[offset : offset + queue_region_size(desc_num)]
        self._h = self._bytes.cast("H")
        self._q = self._bytes.cast("Q")
        self.desc_num = desc_num
        self._counter = 0

    @property
    def region(self) -> memoryview:
        """The region's bytes, for a native data plane that records into it (same layout,
        same order of stores)."""
        return self._bytes

    @property
    def counter(self) -> int:
        """The pop counter the next popped chain gets."""
        return self._counter

    @counter.setter
    def counter(self, value: int) -> None:
        self._counter = value

    # Item indices: header u16s at byte 8 (version), 10, 12, 14; desc i at byte 16 + 16 i.
    def _flag(self, head: int) -> int:
        return HEADER.size + DESC.size * head

    @property
    def used_idx(self) -> int:
        return self._h[7]

    @property
    def last_batch_head(self) -> int:
        return self._h[6]

    def initialize(self) -> None:
        """A fresh region (GET_INFLIGHT_FD): nothing in flight."""
        self._bytes[:] = bytes(len(self._bytes))
        self._h[4] = VERSION
        self._h[5] = self.desc_num

    def recover(self, used_ring_idx: int, queue_size: int) -> tuple[list[int], int]:
        """The heads to resubmit, in pop order, and the next avail index (see the module
        docstring). A region that is not ours (version, size) or holds nonsense is reset."""
        if self._h[4] != VERSION or self._h[5] != self.desc_num or queue_size > self.desc_num:
            self.initialize()
            self._h[7] = used_ring_idx
            return [], used_ring_idx
        if self.used_idx != used_ring_idx:
            head = self.last_batch_head
            if head < self.desc_num:
                self._bytes[self._flag(head)] = 0
            self._h[7] = used_ring_idx
        pending: list[tuple[int, int]] = []
        highest = 0
        for head in range(self.desc_num):
            counter = self._q[(self._flag(head) + 8) // 8]
            highest = max(highest, counter)
            if self._bytes[self._flag(head)]:
                if head >= queue_size:
                    self._bytes[self._flag(head)] = 0  # not a head this ring can have
                    continue
                pending.append((counter, head))
        pending.sort()
        self._counter = highest + 1
        heads = [head for _, head in pending]
        return heads, (used_ring_idx + len(heads)) & 0xFFFF

    def popped(self, head: int) -> None:
        base = self._flag(head)
        self._q[(base + 8) // 8] = self._counter
        self._counter += 1
        self._bytes[base] = 1

    def publishing(self, head: int) -> None:
        """Before the used element and used->idx of ``head`` are stored."""
        self._h[6] = head

    def published(self, head: int, used_idx: int) -> None:
        """After used->idx was stored (``used_idx`` is its new value)."""
        self._bytes[self._flag(head)] = 0
        self._h[7] = used_idx

    def in_flight(self) -> list[int]:
        return [h for h in range(self.desc_num) if self._bytes[self._flag(h)]]

    def release(self) -> None:
        self._h.release()
        self._q.release()
        self._bytes.release()


class InflightArea:
    """The mapped area of every queue: ``num_queues`` regions of ``queue_size`` entries."""

    def __init__(
        self,
        fd: int,
        mmap_size: int,
        mmap_offset: int,
        num_queues: int,
        queue_size: int,
        *,
        state_size: int = 0,
    ) -> None:
        """``state_size``: the bytes the device wants after the queues' regions (see
        :attr:`state`); an area too small for them (an older backend's) has no state."""
        if not 1 <= num_queues <= 1024 or not 1 <= queue_size <= 32768:
            raise InflightError(f"{num_queues} queues of {queue_size} entries is not a queue set")
        need = num_queues * queue_region_size(queue_size)
        if mmap_size < need or mmap_size > MAX_AREA or not 0 <= mmap_offset <= MAX_AREA:
            raise InflightError(
                f"area of {mmap_size:#x} bytes at {mmap_offset:#x} does not hold {num_queues} "
                f"queues of {queue_size} entries ({need:#x} bytes, at most {MAX_AREA:#x})"
            )
        if mmap_offset % ALIGN:
            raise InflightError(f"area offset {mmap_offset:#x} is not {ALIGN}-byte aligned")
        seal_against_shrinking(fd)
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise InflightError(f"inflight fd: {exc.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise InflightError("inflight fd is not a regular file (a memfd)")
        if st.st_size < mmap_offset + mmap_size:
            raise InflightError(
                f"area {mmap_offset:#x}+{mmap_size:#x} is past the end of its file "
                f"({st.st_size:#x} bytes)"
            )
        try:
            self._map = mmap.mmap(fd, mmap_offset + mmap_size)
        except (OSError, ValueError) as exc:
            raise InflightError(f"inflight area cannot be mapped: {exc}") from None
        self.view = memoryview(self._map)[mmap_offset : mmap_offset + mmap_size]
        self.mmap_size = mmap_size
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.queues = [
            QueueInflight(self, i * queue_region_size(queue_size), queue_size)
            for i in range(num_queues)
        ]
        start = state_offset(num_queues, queue_size)
        #: The device's own region (``VhostUserDevice.attach_inflight_state``), or None.
        self.state: memoryview | None = None
        if state_size and start + state_size <= mmap_size:
            self.state = self.view[start : start + state_size]

    @classmethod
    def create(
        cls, num_queues: int, queue_size: int, *, state_size: int = 0
    ) -> tuple[InflightArea, int]:
        """GET_INFLIGHT_FD: a fresh sealed memfd and its mapping, with ``state_size`` bytes of
        zeros for the device after the queues; the caller sends the fd."""
        size = num_queues * queue_region_size(queue_size)
        if state_size:
            size = state_offset(num_queues, queue_size) + state_size
        fd = os.memfd_create("vhost-user-blk-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            area = cls(fd, size, 0, num_queues, queue_size, state_size=state_size)
        except BaseException:
            os.close(fd)
            raise
        for q in area.queues:
            q.initialize()
        return area, fd

    def close(self) -> None:
        for q in self.queues:
            q.release()
        if self.state is not None:
            self.state.release()
        self.view.release()
        self._map.close()
