"""The cluster map: the L1 and L2 tables that say where each guest cluster's bytes live.

qcow2.txt "Cluster mapping": a guest offset splits into an L1 index, an L2 index and an offset
in the cluster; the L1 entry names an L2 table and the L2 entry the host cluster, with flags:
COPIED (this image alone references the cluster, so it may be written in place), ZERO (reads as
zeros, with or without a host cluster kept for it) and COMPRESSED (a compressed descriptor,
see ``compress``). A cluster without a host offset or flag reads from the backing file, or as
zeros without one. :meth:`ClusterMap.extents` turns a guest range into :class:`Extent` runs.

The L1 table is kept whole in memory. L2 tables are read on first use and cached; past
``_L2_CACHE_LIMIT`` half the clean ones are dropped (a dirty table stays until it is written).
Changes (:meth:`ClusterMap.set_entry`, :meth:`ClusterMap.make_writable`) touch memory only and
mark the table dirty; ``writeback`` writes them out, in its order.

Locking: every method runs under the disk's metadata lock, except :meth:`ClusterMap.plain_host`
and :meth:`ClusterMap.contiguous_host`, which reads call without it (see there).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final, NoReturn

from blkdev.disks.disk import SECTOR_SIZE
from blkdev.disks.hostfile import ImageFile
from blkdev.disks.qcow.alloc import Refcounts
from blkdev.disks.qcow.compress import compressed_range
from blkdev.disks.qcow.header import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    U64,
    QcowHeader,
)
from blkdev.disks.qcow.journal import Journal
from blkdev.errors import ImageCorruptError

#: Clean L2 tables kept in memory.
_L2_CACHE_LIMIT: Final = 64 << 20
#: Guest clusters remembered by :meth:`ClusterMap.remember_plain`.
_PLAIN_MAP_LIMIT: Final = 1 << 20
_unpack_u64: Final = U64.unpack_from

# Extent kinds.
NORMAL: Final = 0
"""Allocated data: ``Extent.source`` is the host offset."""
ZERO: Final = 1
"""Reads as zeros (the zero flag, or unallocated without a backing file)."""
BACKING: Final = 2
"""Unallocated, reads from the backing file: ``Extent.source`` is the guest offset."""
COMPRESSED: Final = 3
"""One compressed cluster (never merged): ``Extent.source`` is its L2 entry."""


@dataclass(slots=True)
class Extent:
    """A run of a request whose bytes come from one place (see the kinds above)."""

    kind: int
    start: int
    """Where the run starts, counted from the request's offset."""
    length: int
    source: int


def read_l1_table(file: ImageFile, header: QcowHeader) -> list[int]:
    """The image's L1 table, entry by entry."""
    raw = file.pread(header.l1_table_offset, 8 * header.l1_size) if header.l1_size else b""
    return list(struct.unpack(f">{header.l1_size}Q", raw))


class ClusterMap:
    """The L1 table and the cached L2 tables of one image (see the module docstring)."""

    def __init__(
        self,
        file: ImageFile,
        header: QcowHeader,
        l1: list[int],
        file_size: int,
        *,
        has_backing: bool,
        mark_corrupt: Callable[[str], NoReturn],
    ) -> None:
        self._file = file
        self._path = file.path
        self._header = header
        self._l1 = l1
        self._l1_table_offset = header.l1_table_offset
        self._has_backing = has_backing
        self._mark_corrupt = mark_corrupt
        self._cluster_bits = header.cluster_bits
        self._cluster_size = header.cluster_size
        self._l2_bits = header.cluster_bits - 3
        self._l2_mask = (1 << self._l2_bits) - 1
        #: L2 entry bits that make a cluster other than a plain, aligned data cluster.
        self._not_plain = (
            OFLAG_COMPRESSED | OFLAG_ZERO | (L2E_OFFSET_MASK & (self._cluster_size - 1))
        )
        #: Host offset of an L2 table -> its bytes (the live copy; see the module docstring).
        self._l2_cache: dict[int, bytearray] = {}
        #: Guest cluster -> host offset of plain data clusters, for single-cluster reads
        #: without the lock. Filled under the lock; every L2 entry change drops its key.
        self._plain: dict[int, int] = {}
        self._dirty_l2: set[int] = set()
        self._dirty_l1: set[int] = set()
        self.file_size = file_size
        """The image file's size when last looked at (open, and each writeback): the L2
        tables and compressed clusters read from the file must lie inside it."""
        #: Where every L2 entry change is also recorded (``journal``), and what makes room in
        #: it when it is full (a writeback); set by ``QcowDisk.attach_journal``.
        self.journal: Journal | None = None
        self.make_room: Callable[[], None] = lambda: None

    # ----------------------------------------------------------------- lookups

    def metadata_clusters(self) -> Iterator[int]:
        """The host clusters of the L1 table and of every L2 table it names."""
        bits = self._cluster_bits
        end = self._l1_table_offset + 8 * len(self._l1)
        yield from range(self._l1_table_offset >> bits, (end + self._cluster_size - 1) >> bits)
        for l1_entry in self._l1:
            table_offset = l1_entry & L1E_OFFSET_MASK
            if table_offset:
                yield table_offset >> bits

    def table(self, table_offset: int) -> bytearray:
        """The L2 table at host offset ``table_offset``, read into the cache if need be."""
        table = self._l2_cache.get(table_offset)
        if table is not None:
            return table
        cluster_size = self._cluster_size
        if table_offset % cluster_size or table_offset + cluster_size > self.file_size:
            raise ImageCorruptError(
                f"{self._path}: L2 table at {table_offset:#x} is unaligned or past the end of "
                "the image"
            )
        if len(self._l2_cache) * cluster_size >= _L2_CACHE_LIMIT:
            for clean in [k for k in self._l2_cache if k not in self._dirty_l2][
                : len(self._l2_cache) // 2
            ]:
                del self._l2_cache[clean]
        table = bytearray(self._file.pread(table_offset, cluster_size))
        self._l2_cache[table_offset] = table
        return table

    def entry(self, guest_cluster: int) -> int:
        """The L2 entry of ``guest_cluster`` (0 where no L2 table covers it)."""
        table_offset = self._l1[guest_cluster >> self._l2_bits] & L1E_OFFSET_MASK
        if not table_offset:
            return 0
        table = self.table(table_offset)
        return int(U64.unpack_from(table, (guest_cluster & self._l2_mask) * 8)[0])

    def extents(self, offset: int, length: int) -> list[Extent]:
        """The extents covering guest bytes ``[offset, offset+length)``, adjacent runs of one
        kind merged where their sources are contiguous."""
        cluster_size = self._cluster_size
        out: list[Extent] = []
        pos = offset
        end = offset + length
        while pos < end:
            in_cluster = pos & (cluster_size - 1)
            take = min(cluster_size - in_cluster, end - pos)
            entry = self.entry(pos >> self._cluster_bits)
            if entry & OFLAG_COMPRESSED:
                kind, source = COMPRESSED, entry
            elif entry & OFLAG_ZERO:
                kind, source = ZERO, 0
            else:
                host = entry & L2E_OFFSET_MASK
                if host:
                    if host & (cluster_size - 1):
                        raise ImageCorruptError(
                            f"{self._path}: data cluster offset {host:#x} is unaligned"
                        )
                    kind, source = NORMAL, host + in_cluster
                elif self._has_backing:
                    kind, source = BACKING, pos
                else:
                    kind, source = ZERO, 0
            if out and kind != COMPRESSED:
                last = out[-1]
                if last.kind == kind and (kind == ZERO or last.source + last.length == source):
                    last.length += take
                    pos += take
                    continue
            out.append(Extent(kind, pos - offset, take, source))
            pos += take
        return out

    def plain_host(self, guest_cluster: int) -> int:
        """The host offset of ``guest_cluster`` if :meth:`remember_plain` found it a plain
        data cluster (and no entry change forgot it since), else -1. Safe without the lock."""
        return self._plain.get(guest_cluster, -1)

    def remember_plain(self, guest_cluster: int) -> int:
        """The host offset of ``guest_cluster`` if it is a plain data cluster whose L2 table
        is cached, remembered for :meth:`plain_host`; else -1."""
        host = self.contiguous_host(guest_cluster << self._cluster_bits, self._cluster_size, 0)
        if host >= 0 and len(self._plain) < _PLAIN_MAP_LIMIT:
            self._plain[guest_cluster] = host
        return host

    def contiguous_host(self, offset: int, length: int, need: int) -> int:
        """The host offset of guest bytes ``[offset, offset+length)`` when they lie in normal
        clusters, contiguous in the file, whose L2 tables are cached and whose entries carry
        the flags ``need``; else -1 (take the general path).

        Reads use this without the metadata lock: a cached table is the live one, and one
        entry is read by a single C call. A read racing the guest's own discard or write of the
        same range may see old or new data, as the guest must expect anyway; it never writes.
        """
        bits = self._cluster_bits
        guest_cluster = offset >> bits
        last = (offset + length - 1) >> bits
        if guest_cluster == last:
            # One cluster: the common case, kept short.
            table = self._l2_cache.get(self._l1[guest_cluster >> self._l2_bits] & L1E_OFFSET_MASK)
            if table is None:
                return -1
            entry = _unpack_u64(table, (guest_cluster & self._l2_mask) << 3)[0]
            host = entry & L2E_OFFSET_MASK
            if entry & self._not_plain or not host or entry & need != need:
                return -1
            return int(host + (offset & (self._cluster_size - 1)))
        in_cluster_mask = self._cluster_size - 1
        expected = -1
        start = -1
        while guest_cluster <= last:
            table = self._l2_cache.get(self._l1[guest_cluster >> self._l2_bits] & L1E_OFFSET_MASK)
            if table is None:
                return -1
            entry = _unpack_u64(table, (guest_cluster & self._l2_mask) << 3)[0]
            host = entry & L2E_OFFSET_MASK
            if (
                entry & (OFLAG_COMPRESSED | OFLAG_ZERO)
                or not host
                or host & in_cluster_mask
                or entry & need != need
            ):
                return -1
            if start < 0:
                start = host + (offset & in_cluster_mask)
            elif host != expected:
                return -1
            expected = host + self._cluster_size
            guest_cluster += 1
        return int(start)

    def host_bytes(self, entry: int) -> tuple[int, int] | None:
        """``(offset, length)`` of the host bytes L2 entry ``entry`` references (a compressed
        cluster's sectors, or one cluster), or None when it references none."""
        if entry & OFLAG_COMPRESSED:
            offset, end = compressed_range(self._header, entry)
            start = offset & ~(SECTOR_SIZE - 1)
            return start, end - start
        host = entry & L2E_OFFSET_MASK
        return (host, self._cluster_size) if host else None

    # ----------------------------------------------------------------- changes

    def make_writable(self, refcounts: Refcounts, guest_cluster: int) -> None:
        """Make the L2 table covering ``guest_cluster`` ours to modify: allocated if the L1
        entry names none; its L1 entry marked COPIED. A table another reference shares (only
        snapshots do that, and a writable image has none) marks the image corrupt."""
        l1_index = guest_cluster >> self._l2_bits
        l1_entry = self._l1[l1_index]
        table_offset = l1_entry & L1E_OFFSET_MASK
        if table_offset:
            self.table(table_offset)
            if not l1_entry & OFLAG_COPIED:
                if refcounts.get(table_offset >> self._cluster_bits) != 1:
                    self._mark_corrupt(f"L2 table at {table_offset:#x} is shared (no snapshots)")
                self._l1[l1_index] = table_offset | OFLAG_COPIED
                self._dirty_l1.add(l1_index)
            return
        new = refcounts.allocate(1)
        refcounts.meta.add(new >> self._cluster_bits)
        self._l2_cache[new] = bytearray(self._cluster_size)
        self._dirty_l2.add(new)
        self._l1[l1_index] = new | OFLAG_COPIED
        self._dirty_l1.add(l1_index)

    def set_entry(self, guest_cluster: int, entry: int) -> None:
        """Set the L2 entry of ``guest_cluster``, whose table exists (see
        :meth:`make_writable`)."""
        journal = self.journal
        if journal is not None and journal.full:
            self.make_room()  # a writeback: it ends the epoch, the journal starts empty
        table_offset = self._l1[guest_cluster >> self._l2_bits] & L1E_OFFSET_MASK
        table = self.table(table_offset)
        position = (guest_cluster & self._l2_mask) * 8
        old = int(U64.unpack_from(table, position)[0])
        U64.pack_into(table, position, entry)
        self._plain.pop(guest_cluster, None)
        self._dirty_l2.add(table_offset)
        if journal is not None:
            # Before the request that made the change completes: the journal's reason to be.
            journal.mapping(guest_cluster, old, entry)

    # ----------------------------------------------------------------- writeback

    def l1_entries(self) -> list[int]:
        """A copy of the L1 table."""
        return list(self._l1)

    def replace_l1(self, table_offset: int, l1: list[int]) -> None:
        """Switch to a grown L1 table (written and pointed at by the header already)."""
        assert not self._dirty_l1, "the L1 table must be clean when it moves"
        self._l1 = list(l1)
        self._l1_table_offset = table_offset

    @property
    def dirty_tables(self) -> int:
        """How many L2 tables are dirty."""
        return len(self._dirty_l2)

    def write_l2_tables(self) -> bool:
        """Write the dirty L2 tables (not synced); True if there were any."""
        if not self._dirty_l2:
            return False
        for table_offset in sorted(self._dirty_l2):
            self._file.pwrite(table_offset, self._l2_cache[table_offset])
        self._dirty_l2.clear()
        return True

    def write_l1_entries(self) -> bool:
        """Write the dirty L1 entries (not synced); True if there were any."""
        if not self._dirty_l1:
            return False
        for l1_index in sorted(self._dirty_l1):
            self._file.pwrite(self._l1_table_offset + 8 * l1_index, U64.pack(self._l1[l1_index]))
        self._dirty_l1.clear()
        return True
