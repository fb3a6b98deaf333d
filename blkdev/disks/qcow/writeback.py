"""Writeback: the order in which a writable image's data and metadata reach the disk.

A guest write that needs a new cluster writes its data at once; the metadata that makes the
cluster part of the image (its refcount, its L2 entry, maybe a new L2 table and its L1 entry)
changes in memory only (``alloc``, ``clustermap``) and is written back here, at a guest flush
or when too much is dirty. The order is QEMU's (qcow2.txt "Host cluster management";
block/qcow2-refcount.c), each step made durable with fdatasync before the next one is written:

1. Refcount blocks (and a moved refcount table, written whole), with the data written so far:
   a cluster is counted, and its data durable, before anything on disk points at it.
2. What points at refcount blocks: the header's refcount table fields if the table moved
   (the old table is then freed like any dropped reference, below), else the changed
   refcount table entries.
3. L2 tables.
4. L1 entries: a new L2 table is complete on disk before the L1 entry naming it.
5. Frees (:class:`PendingFree`), in the other direction: a reference (an L2 entry, the old
   refcount table, the bitmaps) is dropped in memory and written back by steps 2-4 *before*
   its cluster's refcount is decremented; the decrements are then written and synced, and
   only after that may the cluster be allocated again (allocations take the same lock, so the
   next one finds the decrement durable, or the writeback failed and writes are refused). A
   crash therefore never leaves a cluster referenced and free; it may leave one counted and
   unreferenced (a leak, which ``qemu-img check`` reports).
6. Free clusters' host storage is punched out (advisory).

Step 5 waits for one more thing (:class:`InflightIo`): data I/O runs outside the metadata lock,
so a write that mapped a cluster before the guest freed it may still be running. Its free is
held back until every I/O that started before it has ended; otherwise the cluster could be
reused (as an L2 table, say) and the late write land on it.

Nothing here sets the dirty bit (lazy refcounts): the image on disk is always consistent, at
worst with leaked clusters. Two header updates happen outside writeback, each synced at once:
the corrupt bit (``disk``: a data write would land on metadata) and dropping persistent bitmaps
at a writable open (``bitmaps``, which says its own order).

A failed writeback is sticky (:attr:`Writeback.error`): after fdatasync fails the kernel may
have dropped the pages it could not write, so a later success would not make the earlier writes
durable. The image on disk is still consistent, by the order above; it must be reopened.

Every method runs under the disk's metadata lock.
"""

from __future__ import annotations

import struct
from typing import Final

from structlog.typing import FilteringBoundLogger

from blkdev.disks.hostfile import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, ImageFile, fallocate
from blkdev.disks.qcow.alloc import PendingFree, Refcounts
from blkdev.disks.qcow.clustermap import ClusterMap
from blkdev.disks.qcow.header import OFF_REFCOUNT_TABLE_OFFSET
from blkdev.disks.qcow.journal import Journal
from blkdev.errors import DiskIOError

#: Dirty metadata beyond this many bytes is written back without waiting for a guest flush.
_DIRTY_LIMIT: Final = 16 << 20
_PENDING_FREE_LIMIT: Final = 4096
#: The header's refcount_table_offset and refcount_table_clusters, written together.
_REFCOUNT_TABLE_FIELDS: Final = struct.Struct(">QI")


class InflightIo:
    """Sequence numbers of the data I/O running outside the metadata lock (reads and
    in-place writes). A free stamped ``s`` (:attr:`next_seq` when it was queued) is applied
    only once :meth:`oldest` is at least ``s``: every I/O that started before it has ended."""

    def __init__(self) -> None:
        self.next_seq = 0
        self._running: dict[int, None] = {}

    def begin(self) -> int:
        seq = self.next_seq
        self.next_seq += 1
        self._running[seq] = None
        return seq

    def end(self, seq: int) -> None:
        del self._running[seq]

    def oldest(self) -> int:
        """The sequence number of the oldest I/O still running, or the next one if none is."""
        return next(iter(self._running), self.next_seq)


class Writeback:
    """The writeback of one writable image (see the module docstring)."""

    def __init__(
        self,
        file: ImageFile,
        clusters: ClusterMap,
        refcounts: Refcounts,
        inflight: InflightIo,
        log: FilteringBoundLogger,
    ) -> None:
        self._file = file
        self._clusters = clusters
        self.refcounts = refcounts
        self._inflight = inflight
        self._cluster_size = refcounts.cluster_size
        self._cluster_bits = refcounts.cluster_bits
        self.log = log
        self._pending_free: list[PendingFree] = []
        #: Data was written since the last fdatasync (step 1 syncs even with no metadata).
        self._unsynced = False
        self._can_punch = True
        self.error: DiskIOError | None = None
        """Set by a failed writeback; every later flush (and write) fails with it."""
        self.journal: Journal | None = None
        """The metadata journal (``journal``), checkpointed once what it holds is durable."""

    def data_written(self) -> None:
        """Data went to the file: the next writeback syncs it (step 1). Call it once the
        write has ended (see ``QcowDisk._end_io``)."""
        self._unsynced = True

    def free_later(self, offset: int, length: int) -> None:
        """Queue host bytes whose reference is gone in memory (step 5)."""
        self._pending_free.append(PendingFree(self._inflight.next_seq, offset, length))

    def release(self, entry: int) -> None:
        """Queue the host bytes of an L2 entry that no longer references them."""
        span = self._clusters.host_bytes(entry)
        if span is not None:
            self.free_later(*span)

    def flush(self) -> None:
        """A guest flush: fail if an earlier writeback failed, else write everything back."""
        if self.error is not None:
            raise self.error
        self.write_back()

    def maybe_write_back(self) -> None:
        """Write back early when too much metadata is dirty or too many frees wait."""
        dirty = (self._clusters.dirty_tables + len(self.refcounts.dirty_blocks)) * (
            self._cluster_size
        )
        if dirty > _DIRTY_LIMIT or len(self._pending_free) > _PENDING_FREE_LIMIT:
            self.write_back()

    def write_back(self) -> None:
        """Write dirty metadata back in crash-safe order (the module docstring)."""
        try:
            self._steps()
        except DiskIOError as e:
            self.error = DiskIOError(
                f"writing back {self._file.path} failed ({e}); the image is consistent on disk "
                "but writes since the last flush may be lost: reopen it",
                e.errno,
            )
            self.log.error("flush failed", errno=e.errno)
            raise self.error from e

    def _steps(self) -> None:
        file = self._file
        refcounts = self.refcounts
        clusters = self._clusters
        # 1. Refcount blocks (and a moved refcount table), with the data written so far.
        if refcounts.write_blocks() or self._unsynced:
            file.sync()
        self._unsynced = False
        # 2. What points at refcount blocks.
        if refcounts.table_moved:
            file.pwrite(
                OFF_REFCOUNT_TABLE_OFFSET,
                _REFCOUNT_TABLE_FIELDS.pack(refcounts.table_offset, refcounts.table_clusters),
            )
            file.sync()
            refcounts.table_moved = False
            for table_offset, table_clusters in refcounts.old_tables:
                self.free_later(table_offset, table_clusters * self._cluster_size)
            refcounts.old_tables.clear()
        elif refcounts.write_table_entries():
            file.sync()
        # 3. L2 tables.
        if clusters.write_l2_tables():
            file.sync()
        # 4. L1 entries.
        if clusters.write_l1_entries():
            file.sync()
        clusters.file_size = max(clusters.file_size, file.size())
        # Every change of the journal's epoch is durable now: a new epoch starts, holding the
        # frees (their dropped references are durable, the decrements below are not yet). Not
        # before: a backend that dies before this point replays the epoch instead.
        self._checkpoint()
        # 5. Frees whose dropped references are now durable, unless an I/O that started
        # before the free could still be using the cluster.
        oldest = self._inflight.oldest()
        ready = [p for p in self._pending_free if p.stamp <= oldest]
        if not ready:
            return
        self._pending_free = [p for p in self._pending_free if p.stamp > oldest]
        freed: list[int] = []
        for pending in ready:
            freed += refcounts.decrement(pending.offset, pending.length)
        if refcounts.write_blocks():
            file.sync()
        self._checkpoint()  # the decrements are durable: the journal forgets those frees
        # 6. Host storage of the clusters that became free.
        self._punch(sorted(freed))

    def _checkpoint(self) -> None:
        if self.journal is None:
            return
        left_out = self.journal.checkpoint([(p.offset, p.length) for p in self._pending_free])
        if left_out:
            self.log.warning(
                "journal full of frees: these leak if the backend dies first", frees=left_out
            )

    def _punch(self, clusters: list[int]) -> None:
        """Give the host storage of free clusters back (advisory, like QEMU's discard
        pass-through); they read as zeros if anything still looked."""
        i = 0
        while i < len(clusters) and self._can_punch:
            j = i
            while j + 1 < len(clusters) and clusters[j + 1] == clusters[j] + 1:
                j += 1
            try:
                fallocate(
                    self._file.fd,
                    FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                    clusters[i] << self._cluster_bits,
                    (j - i + 1) << self._cluster_bits,
                )
            except OSError as e:
                self._can_punch = False
                self.log.debug("cannot punch holes; freed clusters keep their space", errno=e.errno)
            i = j + 1
