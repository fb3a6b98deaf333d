"""Refcounts and cluster allocation for writable images (refcount order 4).

Everything here changes memory only; ``writeback`` writes it back in QEMU's order at a flush
(qcow2.txt "Host cluster management"; block/qcow2-refcount.c): refcount blocks (and a moved
refcount table) first and made durable, then the table entries or the header that point at
them, then L2 tables, then L1. Frees run the other way: the reference is dropped and made
durable before the refcount decrement, and a cluster whose decrement is durable may be reused.
So at any crash point a cluster is either referenced and counted, or counted and unreferenced
(a leak), never referenced and free.
"""

from __future__ import annotations

import builtins
import errno
from dataclasses import dataclass
from typing import Final

from blkdev.disks.hostfile import ImageFile
from blkdev.disks.qcow.header import MAX_REFTABLE_BYTES, REFT_OFFSET_MASK, U64, QcowHeader
from blkdev.errors import DiskIOError, ImageCorruptError

MAX_REFCOUNT_16: Final = 0xFFFF


def get_refcount(block: bytes | bytearray, index: int, order: int) -> int:
    """Entry ``index`` of a refcount block with ``2**order``-bit entries. Sub-byte entries
    are packed from the least significant bit (QEMU's get_refcount_ro0..2)."""
    if order == 4:
        return (block[2 * index] << 8) | block[2 * index + 1]
    bits = 1 << order
    if bits < 8:
        bit = index * bits
        return (block[bit >> 3] >> (bit & 7)) & ((1 << bits) - 1)
    width = bits // 8
    return int.from_bytes(block[index * width : (index + 1) * width], "big")


@dataclass
class PendingFree:
    """Host bytes whose reference is gone in memory; decremented once that is durable and
    no data I/O that started before the free (``stamp``) is still running."""

    stamp: int
    offset: int
    length: int


class Refcounts:
    """In-memory refcount table and blocks of a writable image, with dirty tracking."""

    def __init__(
        self, file: ImageFile, header: QcowHeader, table: list[int], file_size: int
    ) -> None:
        self._file = file
        self.cluster_size = header.cluster_size
        self.cluster_bits = header.cluster_bits
        self.per_block = self.cluster_size // 2
        self.table = table
        self.table_offset = header.refcount_table_offset
        self.table_clusters = header.refcount_table_clusters
        self.blocks: dict[int, bytearray] = {}
        self.dirty_blocks: set[int] = set()
        self.dirty_table: set[int] = set()
        #: The refcount table moved: the header must point at the new one (after it is
        #: durable); the old one is freed after that.
        self.table_moved = False
        self.old_tables: list[tuple[int, int]] = []
        self.end = -(-file_size // self.cluster_size)
        self.hint = 0
        self._reserved: set[int] = set()
        #: Clusters that hold metadata (header, L1, refcount table and blocks, L2 tables): a
        #: data write landing on one of these is a corruption.
        self.meta: set[int] = {0}
        self.meta.update(self._clusters(self.table_offset, self.table_clusters * self.cluster_size))
        for entry in table:
            if entry & REFT_OFFSET_MASK:
                self.meta.add((entry & REFT_OFFSET_MASK) >> self.cluster_bits)

    def _clusters(self, offset: int, length: int) -> range:
        return range(
            offset >> self.cluster_bits,
            (offset + length + self.cluster_size - 1) >> self.cluster_bits,
        )

    def _block(self, block_index: int) -> bytearray | None:
        block = self.blocks.get(block_index)
        if block is not None:
            return block
        if block_index >= len(self.table):
            return None
        off = self.table[block_index] & REFT_OFFSET_MASK
        if off == 0:
            return None
        if off % self.cluster_size or off + self.cluster_size > self._file.size():
            raise ImageCorruptError(
                f"refcount block {block_index} at {off:#x} is unaligned or past the end of the "
                "image"
            )
        block = bytearray(self._file.pread(off, self.cluster_size))
        self.blocks[block_index] = block
        return block

    def get(self, cluster: int) -> int:
        block_index, j = divmod(cluster, self.per_block)
        block = self._block(block_index)
        if block is None:
            return 0
        return (block[2 * j] << 8) | block[2 * j + 1]

    def set(self, cluster: int, value: int) -> None:
        block_index, j = divmod(cluster, self.per_block)
        if block_index >= len(self.table):
            self._grow_table(block_index)
        block = self._block(block_index)
        if block is None:
            block = self._new_block(block_index)
        block[2 * j] = value >> 8
        block[2 * j + 1] = value & 0xFF
        self.dirty_blocks.add(block_index)
        if value and cluster >= self.end:
            self.end = cluster + 1
        if value == 0 and cluster < self.hint:
            self.hint = cluster

    def _new_block(self, block_index: int) -> bytearray:
        block = bytearray(self.cluster_size)
        self.blocks[block_index] = block
        first = block_index * self.per_block
        # Prefer a cluster the block covers itself: it then counts itself and no other block
        # has to change (qcow2.txt allows a refcount block to describe its own cluster).
        # The block did not exist, so every cluster it covers has refcount 0.
        own = next(
            (c for c in range(first, first + self.per_block) if c not in self._reserved), None
        )
        if own is not None:
            self.table[block_index] = own << self.cluster_bits
            self.dirty_table.add(block_index)
            self.meta.add(own)
            j = own - first
            block[2 * j] = 0
            block[2 * j + 1] = 1
            self.dirty_blocks.add(block_index)
            self.end = max(self.end, own + 1)
            return block
        where = self.find_free(1)
        self._reserved.add(where)
        try:
            self.table[block_index] = where << self.cluster_bits
            self.dirty_table.add(block_index)
            self.meta.add(where)
            self.set(where, 1)
        except BaseException:
            # Counting the block's cluster failed (the refcount table is full): forget the
            # block, or a later write would put it on a cluster nothing counts.
            if block_index < len(self.table):
                self.table[block_index] = 0
            self.blocks.pop(block_index, None)
            self.dirty_blocks.discard(block_index)
            self.meta.discard(where)
            raise
        finally:
            self._reserved.discard(where)
        return block

    def _grow_table(self, block_index: int) -> None:
        """Move the refcount table to a larger run of clusters that indexes block ``block_index``.
        DiskIOError (EFBIG), changing nothing, if that needs more than qcow2's maximum table
        (the one :func:`parse_header` accepts): the image is then full."""
        entries_per_cluster = self.cluster_size // 8
        cap = MAX_REFTABLE_BYTES // self.cluster_size
        n = max(min(self.table_clusters * 2, cap), -(-(block_index + 1) // entries_per_cluster))
        while n <= cap:
            start = self.find_free(n)
            # The new table must also index the blocks that will count its own clusters.
            need = max(block_index + 1, (start + n) // self.per_block + 2)
            if n * entries_per_cluster >= need:
                break
            n = -(-need // entries_per_cluster) + 1
        if n > cap:
            limit = cap * entries_per_cluster * self.per_block * self.cluster_size
            raise DiskIOError(
                f"{self._file.path} is full: with {self.cluster_size}-byte clusters a qcow2 "
                f"image can use at most {limit >> 30} GiB of its file (a "
                f"{MAX_REFTABLE_BYTES >> 20} MiB refcount table); copy it to larger clusters "
                "with `qemu-img convert -O qcow2 "
                f"-o cluster_size=65536 {self._file.path} NEW.qcow2`",
                errno.EFBIG,
            )
        old_offset, old_clusters = self.table_offset, self.table_clusters
        self.table = self.table + [0] * (n * entries_per_cluster - len(self.table))
        self.table_offset = start << self.cluster_bits
        self.table_clusters = n
        self.table_moved = True
        self.old_tables.append((old_offset, old_clusters))
        run = range(start, start + n)
        self._reserved.update(run)
        try:
            for c in run:
                self.meta.add(c)
                self.set(c, 1)
        finally:
            self._reserved.difference_update(run)

    def find_free(self, n: int) -> int:
        """First run of ``n`` free clusters at or after the hint."""
        c = self.hint
        while True:
            c = self._next_zero(c)
            for k in range(c, c + n):
                if k in self._reserved or self.get(k):
                    c = k + 1
                    break
            else:
                return c

    def _next_zero(self, c: int) -> int:
        """The first cluster at or after ``c`` whose refcount is 0 (searching whole blocks
        with ``bytes.find``, so full stretches of the image cost little)."""
        block_index, j = divmod(c, self.per_block)
        pos = 2 * j
        while True:
            block = self._block(block_index)
            if block is None:
                return max(c, block_index * self.per_block)
            k = block.find(b"\0\0", pos)
            while k >= 0 and k & 1:
                k = block.find(b"\0\0", k + 1)
            if k >= 0:
                return block_index * self.per_block + k // 2
            block_index += 1
            pos = 0

    def allocate(self, n: int = 1) -> int:
        """Allocate ``n`` contiguous clusters (refcount 1); returns the host offset."""
        start = self.find_free(n)
        run = range(start, start + n)
        self._reserved.update(run)
        try:
            for c in run:
                self.set(c, 1)
        finally:
            self._reserved.difference_update(run)
        if n == 1 or start == self.hint:
            self.hint = start + n
        return start << self.cluster_bits

    def claim(self, clusters: builtins.set[int]) -> None:
        """Count every one of ``clusters`` (refcount 1 where it is 0), as allocations made by a
        process that died before writing them back (``journal``). All are reserved first, so
        no refcount block created on the way lands on one of them."""
        self._reserved.update(clusters)
        try:
            for c in sorted(clusters):
                if self.get(c) == 0:
                    self.set(c, 1)
        finally:
            self._reserved.difference_update(clusters)

    def decrement(self, offset: int, length: int) -> list[int]:
        """Drop one reference from every cluster of ``[offset, offset+length)``; returns the
        clusters that became free."""
        freed: list[int] = []
        for c in self._clusters(offset, length):
            v = self.get(c)
            if v == 0:
                raise ImageCorruptError(f"refcount of cluster {c:#x} would go below zero")
            self.set(c, v - 1)
            if v == 1:
                freed.append(c)
                self.meta.discard(c)
        return freed

    def write_blocks(self) -> bool:
        """Write dirty blocks (and a moved table in full); True if anything was written."""
        wrote = False
        for block_index in sorted(self.dirty_blocks):
            off = self.table[block_index] & REFT_OFFSET_MASK
            self._file.pwrite(off, self.blocks[block_index])
            wrote = True
        self.dirty_blocks.clear()
        if self.table_moved:
            self._file.pwrite(self.table_offset, self.table_bytes())
            self.dirty_table.clear()
            wrote = True
        return wrote

    def write_table_entries(self) -> bool:
        wrote = False
        for block_index in sorted(self.dirty_table):
            self._file.pwrite(
                self.table_offset + 8 * block_index, U64.pack(self.table[block_index])
            )
            wrote = True
        self.dirty_table.clear()
        return wrote

    def table_bytes(self) -> bytes:
        data = b"".join(U64.pack(e) for e in self.table)
        return data + bytes(self.table_clusters * self.cluster_size - len(data))
