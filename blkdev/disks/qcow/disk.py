"""QcowDisk: a qcow2 image (the qcow-lite subset) behind the Disk interface.

This module is the guest's side: it checks each request and decides, cluster by cluster, how
to serve it. The qcow2 rules it relies on live beside it:

- ``header``: the on-disk layouts, header parsing and the qcow-lite subset;
- ``clustermap``: L1/L2 lookups (guest offset -> host extents) and the L2 table cache;
- ``alloc``: refcounts and cluster allocation;
- ``writeback``: the order metadata reaches the disk in, and when freed clusters are reused;
- ``backing``: the backing chain; ``compress``: compressed clusters; ``bitmaps``: persistent
  bitmaps (dropped at a writable open); ``iovecs``: cutting and filling guest buffers.

Reads map each guest cluster through L1/L2 and move allocated data with ``os.preadv`` straight
into guest pages. Writes to clusters only this image references (COPIED) go straight to the
file; a write that needs a new cluster (unallocated, compressed, zero, or shared) allocates it
in memory, writes the data (filled out to the whole cluster with what it read as before: copy
on write), and leaves the metadata dirty. :meth:`QcowDisk.flush` writes the metadata back in
QEMU's order (``writeback``), so the file on disk is always a consistent image (at worst with
leaked clusters) and we never set the dirty bit.

Concurrency: one metadata lock. Writes to allocated clusters run outside it; each carries a
sequence number, and a freed cluster is not reused while a write that started before the free
may still touch it (else a late guest write could land on a reused metadata cluster). Reads of
plain clusters look their mapping up without the lock (``ClusterMap.contiguous_host``): a read
never changes the image, and one racing the guest's own discard may return old or new data.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import threading
from collections.abc import Callable
from typing import Final, NoReturn

import structlog

from blkdev.disks.disk import SECTOR_SIZE
from blkdev.disks.hostfile import ImageFile, lock_image, open_image_file
from blkdev.disks.qcow import journal as jnl
from blkdev.disks.qcow.alloc import Refcounts
from blkdev.disks.qcow.backing import Backing, open_backing, read_backing
from blkdev.disks.qcow.bitmaps import drop_bitmaps
from blkdev.disks.qcow.clustermap import (
    BACKING,
    NORMAL,
    ZERO,
    ClusterMap,
    read_l1_table,
)
from blkdev.disks.qcow.compress import CompressedClusters
from blkdev.disks.qcow.header import (
    INCOMPAT_CORRUPT,
    L2E_OFFSET_MASK,
    MAX_L1_BYTES,
    OFF_INCOMPATIBLE_FEATURES,
    OFF_SIZE,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    U64,
    QcowHeader,
    check_supported,
    l1_entries_needed,
    read_header,
)
from blkdev.disks.qcow.iovecs import ZEROS, copy_into, slice_vecs, zero_vecs
from blkdev.disks.qcow.writeback import InflightIo, Writeback
from blkdev.errors import DiskIOError, ImageCorruptError, ImageError, ResizeRefused
from memory import IoBuffers

log = structlog.get_logger(__name__)

#: Header bytes 24..48: size, crypt_method, l1_size, l1_table_offset (qcow2.txt "Header").
_SIZE_AND_L1: Final = struct.Struct(">QIIQ")


class QcowDisk:
    """A qcow2 image. Use :meth:`open`."""

    format_name: Final = "qcow2"
    network: Final = False
    discard_granularity: Final = 4096
    """What the guest is told (as QEMU tells it for qcow2). A discard frees only the clusters it
    covers whole and ignores the rest, which discard's advisory meaning allows."""

    def __init__(
        self,
        file: ImageFile,
        header: QcowHeader,
        l1: list[int],
        *,
        read_only: bool,
        backing: Backing | None,
    ) -> None:
        self._file = file
        self._header = header
        self._path = file.path
        self._read_only = read_only
        self._backing = backing
        self._cluster_bits = header.cluster_bits
        self._cluster_size = header.cluster_size
        self._lock = threading.RLock()
        self._clusters = ClusterMap(
            file,
            header,
            l1,
            file.size(),
            has_backing=backing is not None,
            mark_corrupt=self._signal_corruption,
        )
        self._compressed = CompressedClusters(file, header)
        self._inflight = InflightIo()
        #: Set by :meth:`_open_writable`; None for a read-only image.
        self._refcounts: Refcounts | None = None
        self._writeback: Writeback | None = None
        self._journal: jnl.Journal | None = None
        self._closed = False
        self._corrupt = False
        self.log = log.bind(image=file.path)

    # ----------------------------------------------------------------- opening

    @classmethod
    def open(
        cls, path: str, *, read_only: bool, allow_backing: bool = True, lock: bool = True
    ) -> QcowDisk:
        """Open (and lock) a qcow2 image; ImageError naming the fix when it cannot be served.
        ``lock=False`` (with ``read_only``) only looks, as ``RawDisk.open`` says."""
        return cls._open(path, read_only=read_only, allow_backing=allow_backing, depth=0, lock=lock)

    @classmethod
    def _open(
        cls, path: str, *, read_only: bool, allow_backing: bool, depth: int, lock: bool = True
    ) -> QcowDisk:
        fd = open_image_file(path, read_only=read_only)
        file = ImageFile(fd, path)
        backing: Backing | None = None
        try:
            if lock or not read_only:
                lock_image(fd, path, read_only=read_only)
            header = read_header(file)
            check_supported(header, path, writable=not read_only)
            if header.backing_file is not None:
                if not allow_backing:
                    raise ImageError(
                        f"{path} is a qcow2 image with a backing file ({header.backing_file}), "
                        "and its format was only probed: pass --format qcow2 to use the backing "
                        "file"
                    )
                backing = open_backing(header, path, depth, cls._open_backing_file)
            l1 = read_l1_table(file, header)
            disk = cls(file, header, l1, read_only=read_only, backing=backing)
            if not read_only:
                disk._open_writable()
            return disk
        except OSError as e:
            if backing is not None:
                backing.close()
            file.close()
            raise ImageError(f"cannot use {path}: {e.strerror}") from None
        except BaseException:
            if backing is not None:
                backing.close()
            file.close()
            raise

    @classmethod
    def _open_backing_file(cls, path: str, depth: int) -> QcowDisk:
        return cls._open(path, read_only=True, allow_backing=True, depth=depth)

    def _open_writable(self) -> None:
        header = self._header
        raw = self._file.pread(
            header.refcount_table_offset, header.refcount_table_clusters * self._cluster_size
        )
        table = list(struct.unpack(f">{len(raw) // 8}Q", raw))
        refcounts = Refcounts(self._file, header, table, self._clusters.file_size)
        refcounts.meta.update(self._clusters.metadata_clusters())
        writeback = Writeback(self._file, self._clusters, refcounts, self._inflight, self.log)
        self._refcounts = refcounts
        self._writeback = writeback
        self._header, owned = drop_bitmaps(self._file, header, refcounts, self._clusters.file_size)
        # Decremented at the next writeback, like every other dropped reference.
        for cluster in owned:
            writeback.free_later(cluster << self._cluster_bits, self._cluster_size)

    # ----------------------------------------------------------------- properties

    @property
    def size(self) -> int:
        return self._header.size

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def supports_discard(self) -> bool:
        return not self._read_only

    @property
    def supports_write_zeroes(self) -> bool:
        return not self._read_only

    @property
    def rdev(self) -> int | None:
        return None  # only this process changes a qcow2 image's size

    @property
    def header(self) -> QcowHeader:
        return self._header

    journal_size: Final = jnl.SIZE
    """Bytes of memory that outlives us the metadata journal needs (``journal``)."""

    def _check(self, offset: int, length: int, write: bool) -> None:
        if self._closed:
            raise ValueError("disk is closed")
        if write and self._read_only:
            raise ValueError("write to a read-only disk")
        if offset < 0 or length < 0 or offset + length > self._header.size:
            raise ValueError(
                f"range {offset}+{length} outside the disk ({self._header.size} bytes)"
            )
        if offset % SECTOR_SIZE or length % SECTOR_SIZE:
            raise ValueError(f"range {offset}+{length} is not in whole sectors")

    def _end_io(self, seq: int, *, wrote: bool = False) -> None:
        with self._lock:
            self._inflight.end(seq)
            if wrote:
                assert self._writeback is not None
                # Set only now: a flush that ran while this write was in flight must not
                # make the next flush skip its fdatasync.
                self._writeback.data_written()

    # ----------------------------------------------------------------- reads

    def read(self, offset: int, buffers: IoBuffers) -> None:
        length = len(buffers)
        self._check(offset, length, write=False)
        if length == 0:
            return
        clusters = self._clusters
        guest_cluster = offset >> self._cluster_bits
        if (offset + length - 1) >> self._cluster_bits == guest_cluster:
            host = clusters.plain_host(guest_cluster)
            if host < 0:
                with self._lock:
                    host = clusters.remember_plain(guest_cluster)
            if host >= 0:
                in_cluster = offset & (self._cluster_size - 1)
                with buffers.lock(True) as locked:
                    self._file.preadv(locked.io_vecs(), host + in_cluster, length)
                return
        with buffers.lock(True) as locked:
            vecs = locked.io_vecs()
            host = clusters.contiguous_host(offset, length, 0)
            if host >= 0:
                self._file.preadv(vecs, host, length)
            else:
                self.read_vecs(offset, vecs)

    def read_vecs(self, offset: int, vecs: list[memoryview]) -> None:
        """Read ``sum(len(v))`` bytes at ``offset`` into ``vecs`` (any byte alignment)."""
        length = sum(len(v) for v in vecs)
        with self._lock:
            extents = self._clusters.extents(offset, length)
            seq = self._inflight.begin()
        try:
            if len(extents) == 1 and extents[0].kind == NORMAL:
                self._file.preadv(vecs, extents[0].source)
                return
            for extent in extents:
                part = slice_vecs(vecs, extent.start, extent.length)
                if extent.kind == NORMAL:
                    self._file.preadv(part, extent.source)
                elif extent.kind == ZERO:
                    zero_vecs(part)
                elif extent.kind == BACKING:
                    self._read_backing(extent.source, extent.length, part)
                else:
                    data = self._decompress(extent.source)
                    in_cluster = (offset + extent.start) & (self._cluster_size - 1)
                    copy_into(part, memoryview(data)[in_cluster : in_cluster + extent.length])
        finally:
            self._end_io(seq)

    def _read_backing(self, offset: int, length: int, vecs: list[memoryview]) -> None:
        assert self._backing is not None
        read_backing(self._backing, offset, length, vecs)

    def _decompress(self, entry: int) -> bytes:
        return self._compressed.read(entry, self._clusters.file_size)

    def _cluster_content(self, guest_cluster: int, entry: int) -> memoryview:
        """What ``guest_cluster`` (L2 entry ``entry``) reads as now, for a partial write's
        fill."""
        cluster_size = self._cluster_size
        if entry & OFLAG_COMPRESSED:
            return memoryview(self._decompress(entry))
        host = entry & L2E_OFFSET_MASK
        if entry & OFLAG_ZERO:
            return memoryview(ZEROS)[:cluster_size]
        buf = bytearray(cluster_size)
        if host:
            self._file.preadv([memoryview(buf)], host)
        elif self._backing is not None:
            guest_offset = guest_cluster << self._cluster_bits
            self._read_backing(
                guest_offset, min(cluster_size, self._header.size - guest_offset), [memoryview(buf)]
            )
        return memoryview(buf)

    # ----------------------------------------------------------------- writes

    cached_io: Final = False
    aio: Final = None  # synchronous: metadata updates are ordered by the metadata lock

    def fast_target(self) -> tuple[int, int, int] | None:
        return None  # guest offsets go through the cluster map

    def read_cached(self, offset: int, buffers: IoBuffers) -> bool:
        del offset, buffers
        return False  # every request goes to an I/O thread (the metadata lock may wait)

    def write_cached(self, offset: int, buffers: IoBuffers) -> bool:
        del offset, buffers
        return False

    def write(self, offset: int, buffers: IoBuffers) -> None:
        length = len(buffers)
        self._check(offset, length, write=True)
        if length == 0:
            return
        with buffers.lock(False) as locked:
            self._write_vecs(offset, list(locked.io_vecs()))

    def _writable(self) -> Writeback:
        if self._corrupt:
            raise ImageCorruptError(
                f"{self._path} was marked corrupt; check it with `qemu-img check {self._path}`"
            )
        writeback = self._writeback
        assert writeback is not None
        if writeback.error is not None:
            raise writeback.error
        return writeback

    def _write_vecs(self, offset: int, vecs: list[memoryview]) -> None:
        length = sum(len(v) for v in vecs)
        with self._lock:
            writeback = self._writable()
            host = self._clusters.contiguous_host(offset, length, OFLAG_COPIED)
            if host < 0:
                self._write_allocating(writeback, offset, vecs, length)
                writeback.maybe_write_back()
                return
            # Allocated clusters only this image references: write in place, outside the
            # lock. The sequence number keeps them from being reused until this write ends.
            self._check_target(writeback.refcounts, host, length)
            seq = self._inflight.begin()
        try:
            self._file.pwritev(vecs, host)
        finally:
            self._end_io(seq, wrote=True)

    def _check_target(self, refcounts: Refcounts, host_offset: int, length: int) -> None:
        """Overlap check (QEMU's qcow2_check_metadata_overlap): a data write must not land on
        metadata or past what the image has allocated."""
        bits = self._cluster_bits
        first = host_offset >> bits
        last = (host_offset + length - 1) >> bits
        limit = max(refcounts.end, -(-self._clusters.file_size // self._cluster_size))
        for cluster in range(first, last + 1):
            if cluster in refcounts.meta or cluster >= limit:
                self._signal_corruption(
                    f"data write to host offset {host_offset:#x} would overwrite metadata"
                    if cluster in refcounts.meta
                    else f"data cluster {cluster << bits:#x} lies past the end of the image"
                )

    def _signal_corruption(self, why: str) -> NoReturn:
        """Mark the image corrupt (the header's corrupt bit, written and synced at once, so
        no one trusts it until it is checked) and fail. Later writes are refused, and close
        writes nothing back."""
        self._corrupt = True
        self.log.error("image corrupt; marked", reason=why)
        if not self._read_only:
            try:
                flags = self._header.incompatible_features | INCOMPAT_CORRUPT
                self._file.pwrite(OFF_INCOMPATIBLE_FEATURES, U64.pack(flags))
                self._file.sync()
            except DiskIOError:
                pass
        raise ImageCorruptError(
            f"{self._path}: {why}; the image is marked corrupt: check it with "
            f"`qemu-img check {self._path}`"
        )

    def _write_allocating(
        self, writeback: Writeback, offset: int, vecs: list[memoryview], length: int
    ) -> None:
        """Write ``vecs`` at guest ``offset`` cluster by cluster, under the lock: in place
        where this image alone references the cluster, else into a new one."""
        refcounts = writeback.refcounts
        cluster_size = self._cluster_size
        pos = offset
        end = offset + length
        while pos < end:
            in_cluster = pos & (cluster_size - 1)
            take = min(cluster_size - in_cluster, end - pos)
            guest_cluster = pos >> self._cluster_bits
            part = slice_vecs(vecs, pos - offset, take)
            entry = self._clusters.entry(guest_cluster)
            host = entry & L2E_OFFSET_MASK
            normal = not entry & (OFLAG_COMPRESSED | OFLAG_ZERO) and host
            if normal and (entry & OFLAG_COPIED or refcounts.get(host >> self._cluster_bits) == 1):
                if host & (cluster_size - 1):
                    raise ImageCorruptError(f"{self._path}: data offset {host:#x} unaligned")
                self._check_target(refcounts, host + in_cluster, take)
                self._file.pwritev(part, host + in_cluster)
                if not entry & OFLAG_COPIED:
                    self._clusters.set_entry(guest_cluster, entry | OFLAG_COPIED)
            else:
                self._allocate_and_write(writeback, guest_cluster, entry, in_cluster, part, take)
            writeback.data_written()
            pos += take

    def _allocate_and_write(
        self,
        writeback: Writeback,
        guest_cluster: int,
        entry: int,
        in_cluster: int,
        part: list[memoryview],
        take: int,
    ) -> None:
        """Write ``part`` (``take`` bytes at ``in_cluster``) into a cluster of its own for
        ``guest_cluster``, filled out with what the cluster read as (copy on write), and point
        the L2 entry at it. A zero cluster that kept its allocation and is this image's alone
        is written in place instead."""
        refcounts = writeback.refcounts
        cluster_size = self._cluster_size
        host = entry & L2E_OFFSET_MASK
        reuse = (
            not entry & OFLAG_COMPRESSED
            and entry & OFLAG_ZERO
            and host
            and not host & (cluster_size - 1)
            and (entry & OFLAG_COPIED or refcounts.get(host >> self._cluster_bits) == 1)
        )
        self._clusters.make_writable(refcounts, guest_cluster)
        if reuse:
            target = host
            self._check_target(refcounts, target, cluster_size)
        else:
            target = refcounts.allocate(1)
        if take == cluster_size:
            self._file.pwritev(part, target)
        else:
            base = self._cluster_content(guest_cluster, entry)
            self._file.pwritev(
                [base[:in_cluster], *part, base[in_cluster + take :]],
                target,
            )
        self._clusters.set_entry(guest_cluster, target | OFLAG_COPIED)
        if not reuse:
            writeback.release(entry)

    # ----------------------------------------------------------------- discard / zeroes

    def discard(self, offset: int, length: int) -> None:
        self._check(offset, length, write=True)
        self._zero_clusters(offset, length, unmap=True, exact=False)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self._check(offset, length, write=True)
        self._zero_clusters(offset, length, unmap=unmap, exact=True)

    def _zero_clusters(self, offset: int, length: int, *, unmap: bool, exact: bool) -> None:
        if length == 0:
            return
        cluster_size = self._cluster_size
        end = offset + length
        first_full = -(-offset // cluster_size) * cluster_size
        last_full = end // cluster_size * cluster_size
        with self._lock:
            writeback = self._writable()
            if exact:
                # Partial clusters at either edge must read as zeros afterwards.
                if first_full > offset:
                    self._zero_partial(writeback, offset, min(first_full, end) - offset)
                if last_full < end and last_full >= first_full:
                    self._zero_partial(writeback, last_full, end - last_full)
            for guest_cluster in range(
                first_full >> self._cluster_bits, last_full >> self._cluster_bits
            ):
                self._zero_cluster(writeback, guest_cluster, unmap=unmap)
            writeback.maybe_write_back()

    def _zero_partial(self, writeback: Writeback, offset: int, length: int) -> None:
        """Make ``[offset, offset+length)``, inside one cluster, read as zeros. Nothing to do
        where it already does (a zero cluster; unallocated without a backing file or over
        zeros in it); an allocated cluster gets zeros in place (``_write_allocating`` keeps
        a cluster only this image references); only what shows other content (compressed, a
        backing file's data) needs a new cluster."""
        entry = self._clusters.entry(offset >> self._cluster_bits)
        if not entry & OFLAG_COMPRESSED:
            if entry & OFLAG_ZERO:
                return
            if not entry & L2E_OFFSET_MASK:
                if self._backing is None:
                    return
                buf = bytearray(length)
                self._read_backing(offset, length, [memoryview(buf)])
                if buf == ZEROS[:length]:
                    return
        self._write_allocating(writeback, offset, [memoryview(ZEROS)[:length]], length)

    def _zero_cluster(self, writeback: Writeback, guest_cluster: int, *, unmap: bool) -> None:
        entry = self._clusters.entry(guest_cluster)
        backing = self._backing is not None
        host = entry & L2E_OFFSET_MASK
        if not entry and not backing:
            return
        if entry == OFLAG_ZERO:
            return
        if (
            not unmap
            and host
            and not entry & OFLAG_COMPRESSED
            and entry & OFLAG_COPIED
            and not host & (self._cluster_size - 1)
        ):
            # Keep the allocation (the guest asked not to unmap); the zero flag hides the data.
            new = host | OFLAG_COPIED | OFLAG_ZERO
            if new != entry:
                self._clusters.make_writable(writeback.refcounts, guest_cluster)
                self._clusters.set_entry(guest_cluster, new)
            return
        self._clusters.make_writable(writeback.refcounts, guest_cluster)
        # Where a backing file would show through, only the zero flag makes the cluster read
        # as zeros; without one an unallocated cluster already does.
        self._clusters.set_entry(guest_cluster, OFLAG_ZERO if backing else 0)
        writeback.release(entry)

    # ----------------------------------------------------------------- resize

    def resize(self, new_size: int, *, force: bool = False) -> None:
        """Grow the virtual size, crash-safely (``force`` does not apply: shrinking a qcow2
        image is refused; ``qemu-img resize --shrink`` does it with the VM stopped).

        The order is QEMU's (qcow2_grow_l1_table): when the L1 table must grow, a new one is
        allocated and its refcounts made durable, the new table is written and synced, and
        only then does one header write (size, L1 size and offset: bytes 24..48, inside one
        sector) switch to it; the old table is freed afterwards. A crash at any point leaves
        either the old image or the new one, at worst with a leaked cluster.
        """
        del force
        with self._lock:
            if self._closed:
                raise ValueError("disk is closed")
            header = self._header
            if self._read_only:
                raise ResizeRefused(f"{self._path} is served read-only")
            if new_size <= 0 or new_size % SECTOR_SIZE:
                raise ResizeRefused(f"{new_size} is not a positive multiple of {SECTOR_SIZE} bytes")
            if new_size < header.size:
                raise ResizeRefused(
                    f"{new_size} is smaller than the disk ({header.size} bytes): shrinking a "
                    "qcow2 image is not supported while serving (with the VM stopped: "
                    "qemu-img resize --shrink)"
                )
            if new_size == header.size:
                return
            l1_size = l1_entries_needed(new_size, self._cluster_bits)
            if l1_size * 8 > MAX_L1_BYTES:
                raise ResizeRefused(f"{new_size} bytes needs an L1 table larger than QEMU allows")
            writeback = self._writable()
            # Everything dirty goes first: the L1 entries are then clean, so the table
            # copied below is the one on disk.
            writeback.write_back()
            file = self._file
            try:
                if l1_size <= header.l1_size:
                    file.pwrite(OFF_SIZE, U64.pack(new_size))
                    file.sync()
                    self._header = dataclasses.replace(header, size=new_size)
                else:
                    self._grow_l1(writeback, header, new_size, l1_size)
            except DiskIOError:
                self.log.error("resize failed", size=new_size)
                raise
        self.log.info("image resized", size=new_size)

    def _grow_l1(
        self, writeback: Writeback, header: QcowHeader, new_size: int, l1_size: int
    ) -> None:
        file = self._file
        refcounts = writeback.refcounts
        table_bytes = l1_size * 8
        n_clusters = -(-table_bytes // self._cluster_size)
        table_offset = refcounts.allocate(n_clusters)
        for c in range(
            table_offset >> self._cluster_bits, (table_offset >> self._cluster_bits) + n_clusters
        ):
            refcounts.meta.add(c)
        # 1. The new table's refcounts (the data is already synced).
        writeback.write_back()
        # 2. The new table: the old entries, then zeros, padded to whole clusters.
        l1 = self._clusters.l1_entries() + [0] * (l1_size - header.l1_size)
        table = bytearray(n_clusters * self._cluster_size)
        struct.pack_into(f">{l1_size}Q", table, 0, *l1)
        file.pwrite(table_offset, table)
        file.sync()
        # 3. One header write switches to it.
        file.pwrite(
            OFF_SIZE, _SIZE_AND_L1.pack(new_size, header.crypt_method, l1_size, table_offset)
        )
        file.sync()
        old_offset, old_size = header.l1_table_offset, header.l1_size
        self._header = dataclasses.replace(
            header, size=new_size, l1_size=l1_size, l1_table_offset=table_offset
        )
        self._clusters.replace_l1(table_offset, l1)
        # 4. The old table is freed like any dropped reference.
        if old_size:
            writeback.free_later(
                old_offset, -(-old_size * 8 // self._cluster_size) * self._cluster_size
            )
        writeback.write_back()

    def refresh_size(self) -> int:
        """Only this process changes a qcow2 image's size (the image is locked)."""
        return self._header.size

    def follow_size(self, changed: Callable[[], None]) -> Callable[[], None] | None:
        return None

    # ----------------------------------------------------------------- flush / close

    def flush(self) -> None:
        if self._closed:
            raise ValueError("disk is closed")
        if self._read_only:
            return
        with self._lock:
            assert self._writeback is not None
            self._writeback.flush()

    # ----------------------------------------------------------------- the journal

    def attach_journal(self, region: memoryview | None) -> None:
        """Keep the metadata journal in ``region`` (memory that outlives this process: the
        inflight area), replaying first what a backend that died left there; None detaches
        it (before that memory goes away). See ``journal``.

        Replayed changes are written back at once, so the new journal starts empty. A region
        that holds no journal of this image, or one that does not fit the image, is logged
        and started afresh: its changes are lost, and the log says how many."""
        with self._lock:
            self._detach_journal()
            writeback = self._writeback
            if region is None or self._closed or writeback is None or self._corrupt:
                return
            st = os.fstat(self._file.fd)
            identity = {
                "st_dev": st.st_dev,
                "st_ino": st.st_ino,
                "cluster_bits": self._cluster_bits,
            }
            changes: list[jnl.Change] = []
            replayed = 0
            try:
                changes = jnl.parse(region, **identity)
                if changes:
                    self._replay(writeback, changes)
                    replayed = len(changes)
                    self.log.warning(
                        "replayed the journal of a backend that died", changes=replayed
                    )
            except (jnl.JournalInvalid, ImageCorruptError) as e:
                self.log.error(
                    "journal not replayed: its changes are lost", changes=len(changes), error=str(e)
                )
            # May raise DiskIOError (sticky): the region then keeps the journal it held.
            writeback.write_back()
            journal = jnl.Journal(region, **identity)
            self.log.info("metadata journal kept in the inflight area", replayed=replayed)
            self._journal = journal
            writeback.journal = journal
            self._clusters.journal = journal
            self._clusters.make_room = writeback.write_back

    def _detach_journal(self) -> None:
        journal, self._journal = self._journal, None
        if journal is None:
            return
        writeback = self._writeback
        assert writeback is not None
        try:
            # What only the journal made survivable becomes durable before it goes.
            if not self._corrupt and writeback.error is None:
                writeback.write_back()
        except DiskIOError:
            pass  # logged and sticky: every later flush fails
        finally:
            writeback.journal = None
            self._clusters.journal = None
            journal.close()

    def _replay(self, writeback: Writeback, changes: list[jnl.Change]) -> None:
        """Apply the changes of a dead backend's epoch to what the image holds on disk (which
        may be the epoch's start, or partly its end if that backend died writing back).

        Everything is checked before anything changes (the front-end owns the memory the
        journal lives in): each cluster's changes chain (one's ``new`` is the next one's
        ``old``), the image holds either the chain's start or its end, new clusters are data
        clusters inside the file, counted at most once and claimed by one guest cluster, and
        nothing released is metadata. A forged journal can then scramble the guest's own data,
        never the image's metadata or anything outside the image."""
        refcounts = writeback.refcounts
        bits = self._cluster_bits
        guest_clusters = -(-self._header.size // self._cluster_size)
        file_clusters = -(-self._file.size() // self._cluster_size)
        first: dict[int, int] = {}
        last: dict[int, int] = {}
        owner: dict[int, int] = {}
        frees: list[jnl.Free] = []

        def span(offset: int, length: int) -> range:
            return range(offset >> bits, -(-(offset + length) // self._cluster_size))

        def data_cluster(entry: int, what: str) -> int:
            """The host cluster a plain L2 entry names (0: none); JournalInvalid if it could
            not be one of this image's data clusters."""
            if entry & OFLAG_COMPRESSED:
                raise jnl.JournalInvalid(f"{what} entry {entry:#x} is compressed")
            host = entry & L2E_OFFSET_MASK
            if not host:
                return 0
            cluster = host >> bits
            if host & (self._cluster_size - 1) or cluster >= file_clusters:
                raise jnl.JournalInvalid(f"{what} entry {entry:#x} is not a cluster of the file")
            if cluster in refcounts.meta:
                raise jnl.JournalInvalid(f"{what} entry {entry:#x} names metadata")
            return cluster

        for change in changes:
            if isinstance(change, jnl.Free):
                if change.offset + change.length > self._file.size() or any(
                    c in refcounts.meta for c in span(change.offset, change.length)
                ):
                    raise jnl.JournalInvalid(f"free of {change.offset:#x}+{change.length:#x}")
                frees.append(change)
                continue
            g = change.guest_cluster
            if g >= guest_clusters:
                raise jnl.JournalInvalid(f"guest cluster {g} is past the disk")
            if g in last and last[g] != change.old:
                raise jnl.JournalInvalid(f"guest cluster {g}: changes do not chain")
            first.setdefault(g, change.old)
            last[g] = change.new
            new = data_cluster(change.new, "new")
            if change.old & OFLAG_COMPRESSED:  # a compressed cluster rewritten: freed after
                old_span = self._clusters.host_bytes(change.old)
                assert old_span is not None
                if any(c in refcounts.meta for c in span(*old_span)):
                    raise jnl.JournalInvalid(f"old entry {change.old:#x} names metadata")
                old = 0
            else:
                old = data_cluster(change.old, "old")
            if new and new != old:
                if owner.setdefault(new, g) != g:
                    raise jnl.JournalInvalid(f"host cluster {new:#x} claimed twice")
        for g, start in first.items():
            if self._clusters.entry(g) not in (start, last[g]):
                raise jnl.JournalInvalid(f"guest cluster {g}: the image holds neither end")
        for cluster in owner:
            if refcounts.get(cluster) > 1:
                raise jnl.JournalInvalid(f"host cluster {cluster:#x} is shared")

        # Checked: apply. Counted first, so that no L2 table allocated below lands on one.
        refcounts.claim(set(owner))
        for g, entry in last.items():
            if self._clusters.entry(g) != entry:
                self._clusters.make_writable(refcounts, g)
                self._clusters.set_entry(g, entry)
        for change in changes:
            if isinstance(change, jnl.Mapping):
                old_host = self._clusters.host_bytes(change.old)
                new_host = self._clusters.host_bytes(change.new)
                if old_host is not None and (new_host is None or old_host[0] != new_host[0]):
                    writeback.release(change.old)
            elif all(refcounts.get(c) for c in span(change.offset, change.length)):
                writeback.free_later(change.offset, change.length)  # else it was applied

    # ----------------------------------------------------------------- close

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._detach_journal()
            writeback = self._writeback
            try:
                if writeback is not None and not self._corrupt and writeback.error is None:
                    writeback.write_back()
            except DiskIOError:
                pass  # logged by write_back; closing must still release the image
            finally:
                self._closed = True
                if self._backing is not None:
                    self._backing.close()
                self._file.close()
