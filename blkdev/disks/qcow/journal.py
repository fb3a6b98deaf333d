"""The metadata journal: qcow2 changes a guest saw complete, kept where they outlive the process.

A guest write that allocates a cluster is complete for the guest once its data is in the file
and its new L2 entry is in our memory (``writeback`` makes the entry durable at the next guest
flush, in QEMU's crash-safe order). If the backend dies between the two (kill -9, a crash, an
upgrade), the data is in the host's page cache but the entry dies with the process: the next
backend sees the cluster unallocated, and answers the FLUSH the guest resubmits with success. A
write the guest was told is done, and then flushed, is lost.

Power loss may lose an unflushed write (virtio-blk's contract); a backend restart may not,
because the guest lives on. So every L2 entry change is also appended to this journal, before
the request completes, in memory that survives the process but not the VM: a region of the
inflight area (``vhost_user.ring.inflight``), a memfd QEMU holds and hands to the next backend.
The next backend replays it (:func:`parse` then ``QcowDisk.attach_journal``), writes everything
back and starts an empty journal. The journal never reaches the image file: after a power
loss, when the memfd is gone too, the image is exactly what ``writeback``'s order left.

An *epoch* is what changed since the last writeback. ``Writeback`` checkpoints at the end of
its metadata steps (and again after it frees clusters): the changes are durable, the epoch ends,
and the new one starts with the frees still waiting (:class:`Free`: their dropped references
are durable, their decrements are not). The two slots make that switch one store: the next
epoch is written into the idle slot, then ``active`` names it.

Layout (native byte order: only processes of this host read it)::

    header, 64 bytes:
        u32 magic   "QJN1"
        u32 version
        u32 active          the slot in use: 0 or 1            (one store)
        u32 count[2]        committed entries of each slot      (one store each)
        u32 capacity        entries per slot
        u32 cluster_bits    of the image
        u32 padding
        u64 st_dev, st_ino  of the image file: a journal names its image
        padding to 64
    slot 0, slot 1: capacity entries of 24 bytes each:
        u64 key     guest_cluster << 1 (a mapping) | host_offset << 1 | 1 (a free)
        u64 old     the L2 entry before (a mapping) | the length (a free)
        u64 new     the L2 entry after  (a mapping) | 0

An entry is written whole, then the slot's count grows past it (a single 4-byte store): a
process killed in between leaves the entry uncounted, and the request that made it was not
complete (it is resubmitted). Nothing here is read back while we run: the front-end owns the
memfd and may scribble on it, so the journal is only trusted as far as :func:`parse` and the
replay's checks against the image go.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

MAGIC: Final = 0x314E4A51  # "QJN1" read as a little-endian u32
VERSION: Final = 1
HEADER: Final = struct.Struct("=IIIIIIIIQQ16x")
"""magic, version, active, count0, count1, capacity, cluster_bits, padding, st_dev, st_ino."""
ENTRY: Final = struct.Struct("=QQQ")
"""key, old, new."""
# u32 indices (of the header's cast("I") view) of the fields stored one at a time.
_ACTIVE: Final = 2
_COUNT: Final = (3, 4)

CAPACITY: Final = 16384
"""Entries per slot (an epoch holds at most this many changes before it is written back)."""
SIZE: Final = HEADER.size + 2 * CAPACITY * ENTRY.size
"""Bytes the journal asks of the inflight area."""


class JournalInvalid(Exception):
    """The region holds something that is not a journal of this image; it is not replayed."""


@dataclass(frozen=True, slots=True)
class Mapping:
    """The L2 entry of ``guest_cluster`` went from ``old`` to ``new``."""

    guest_cluster: int
    old: int
    new: int


@dataclass(frozen=True, slots=True)
class Free:
    """Host bytes whose reference is durably gone and whose refcount is not yet decremented."""

    offset: int
    length: int


Change = Mapping | Free


def parse(view: memoryview, *, st_dev: int, st_ino: int, cluster_bits: int) -> list[Change]:
    """The changes of the active epoch, in order. An all-zero region (a fresh area) is an
    empty journal; anything else that is not a journal of this image is JournalInvalid."""
    if len(view) < HEADER.size:
        raise JournalInvalid(f"region of {len(view)} bytes is smaller than the journal header")
    magic, version, active, count0, count1, capacity, bits, _, dev, ino = HEADER.unpack_from(view)
    if magic == 0 and not any(view[: HEADER.size]):
        return []
    if magic != MAGIC or version != VERSION:
        raise JournalInvalid(f"not a journal (magic {magic:#x}, version {version})")
    if (dev, ino) != (st_dev, st_ino) or bits != cluster_bits:
        raise JournalInvalid("the journal belongs to another image")
    if active > 1 or not 0 < capacity or HEADER.size + 2 * capacity * ENTRY.size > len(view):
        raise JournalInvalid(f"slot {active} of {capacity} entries does not fit the region")
    count = (count0, count1)[active]
    if count > capacity:
        raise JournalInvalid(f"{count} entries in a slot of {capacity}")
    base = HEADER.size + active * capacity * ENTRY.size
    changes: list[Change] = []
    for i in range(count):
        key, old, new = ENTRY.unpack_from(view, base + i * ENTRY.size)
        if key & 1:
            if new or not old:
                raise JournalInvalid(f"entry {i}: a free of {old} bytes")
            changes.append(Free(key >> 1, old))
        else:
            changes.append(Mapping(key >> 1, old, new))
    return changes


class Journal:
    """The writer: appends the changes of the running epoch (see the module docstring).

    Runs under the disk's metadata lock, like everything that changes metadata."""

    def __init__(self, view: memoryview, *, st_dev: int, st_ino: int, cluster_bits: int) -> None:
        if len(view) < SIZE:
            raise ValueError(f"a journal needs {SIZE} bytes, the region has {len(view)}")
        self._view = view[:SIZE]
        self._u32 = self._view[: HEADER.size].cast("I")
        self.capacity = CAPACITY
        # A new journal, empty: the header is written with both counts zero, so a process
        # killed while writing it leaves either an empty journal or an invalid one (dropped).
        self._view[: HEADER.size] = HEADER.pack(
            MAGIC, VERSION, 0, 0, 0, CAPACITY, cluster_bits, 0, st_dev, st_ino
        )
        self._active = 0
        self._count = 0

    @property
    def full(self) -> bool:
        return self._count >= self.capacity

    def _entry_offset(self, slot: int, index: int) -> int:
        return HEADER.size + (slot * self.capacity + index) * ENTRY.size

    def mapping(self, guest_cluster: int, old: int, new: int) -> None:
        """Record an L2 entry change (the caller made room first: :attr:`full` is False)."""
        self._append(self._active, guest_cluster << 1, old, new)

    def _append(self, slot: int, key: int, old: int, new: int) -> None:
        if self._count >= self.capacity:
            raise RuntimeError("journal full: the caller writes back first")
        offset = self._entry_offset(slot, self._count)
        ENTRY.pack_into(self._view, offset, key, old, new)
        self._count += 1
        self._u32[_COUNT[slot]] = self._count  # commits the entry: one 4-byte store

    def checkpoint(self, frees: list[tuple[int, int]]) -> int:
        """Everything up to now is durable: start a new epoch holding ``frees`` (offset,
        length) still to be decremented. Returns how many frees did not fit (they become
        leaks if the process dies before they are applied)."""
        idle = 1 - self._active
        self._u32[_COUNT[idle]] = 0
        kept = frees[: self.capacity // 2]  # room left for the epoch's own changes
        for i, (offset, length) in enumerate(kept):
            ENTRY.pack_into(self._view, self._entry_offset(idle, i), (offset << 1) | 1, length, 0)
        self._u32[_COUNT[idle]] = len(kept)
        self._u32[_ACTIVE] = idle  # the switch: one 4-byte store
        self._active = idle
        self._count = len(kept)
        return len(frees) - len(kept)

    def close(self) -> None:
        self._u32.release()
        self._view.release()
