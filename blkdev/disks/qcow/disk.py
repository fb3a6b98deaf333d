"""QcowDisk: a qcow2 image (the qcow-lite subset) behind the Disk interface.

Reads map each guest cluster through L1/L2 (cached in memory) and move allocated data with
``os.preadv`` straight into guest pages. Writes to allocated clusters go straight to the file;
writes that need a new cluster allocate it in memory, write the data, and leave the metadata
dirty. :meth:`QcowDisk.flush` writes metadata back in QEMU's order (see ``alloc``), so the file
on disk is always a consistent image (at worst with leaked clusters) and we never set the dirty
bit.

Concurrency: one metadata lock. Writes to allocated clusters run outside it; each carries a
sequence number, and a freed cluster is not reused while a write that started before the free
may still touch it (else a late guest write could land on a reused metadata cluster). Reads of
plain clusters look their mapping up without the lock (see ``_contiguous_host``): a read never
changes the image, and one racing the guest's own discard may return old or new data.
"""

from __future__ import annotations

import os
import struct
import threading
from collections import OrderedDict
from dataclasses import replace
from typing import Final, Protocol

import structlog

from blkdev.disks.disk import SECTOR_SIZE
from blkdev.disks.hostfile import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    ImageFile,
    fallocate,
    lock_image,
    open_image_file,
)
from blkdev.disks.qcow.alloc import PendingFree, Refcounts
from blkdev.disks.qcow.compress import decompress_cluster
from blkdev.disks.qcow.header import (
    AUTOCLEAR_BITMAPS,
    BITMAP_DIR_ENTRY,
    EXT_BITMAPS,
    INCOMPAT_CORRUPT,
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    MAX_CLUSTER_BITS,
    OFF_AUTOCLEAR_FEATURES,
    OFF_INCOMPATIBLE_FEATURES,
    OFF_REFCOUNT_TABLE_OFFSET,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    U64,
    QcowHeader,
    check_supported,
    extensions_without,
    parse_header,
)
from blkdev.errors import DiskIOError, ImageCorruptError, ImageError, UnsupportedImageError
from memory import IoBuffers

log = structlog.get_logger(__name__)

MAX_BACKING_DEPTH: Final = 32
#: Dirty metadata beyond this many bytes is written back without waiting for a guest flush.
_DIRTY_LIMIT: Final = 16 << 20
#: Clean L2 tables kept in memory.
_L2_CACHE_LIMIT: Final = 64 << 20
_PENDING_FREE_LIMIT: Final = 4096
_PLAIN_MAP_LIMIT: Final = 1 << 20
#: Bitmap directories and tables above this are not walked (their clusters then leak).
_BITMAP_DIR_LIMIT: Final = 64 << 20
_DECOMPRESSED_CACHE: Final = 8
_ZEROS: Final = bytes(1 << MAX_CLUSTER_BITS)
_REFT_FIELDS: Final = struct.Struct(">QI")
_unpack_u64: Final = U64.unpack_from

# Extent kinds of a mapped request.
_NORMAL: Final = 0
_ZERO: Final = 1
_BACKING: Final = 2
_COMPRESSED: Final = 3


class Backing(Protocol):
    @property
    def size(self) -> int: ...

    def read_vecs(self, offset: int, vecs: list[memoryview]) -> None: ...

    def close(self) -> None: ...


class RawBacking:
    """A raw backing file, read-only; bytes past its end read as zeros."""

    def __init__(self, f: ImageFile, size: int) -> None:
        self._f = f
        self._size = size

    @classmethod
    def open(cls, path: str) -> RawBacking:
        fd = open_image_file(path, read_only=True)
        f = ImageFile(fd, path)
        try:
            lock_image(fd, path, read_only=True)
            return cls(f, f.size())
        except BaseException:
            f.close()
            raise

    @property
    def size(self) -> int:
        return self._size

    def read_vecs(self, offset: int, vecs: list[memoryview]) -> None:
        self._f.preadv(vecs, offset)

    def close(self) -> None:
        self._f.close()


def _slice_vecs(vecs: list[memoryview], start: int, length: int) -> list[memoryview]:
    """Bytes ``[start, start+length)`` of the concatenation of ``vecs``."""
    out: list[memoryview] = []
    pos = 0
    for v in vecs:
        n = len(v)
        if pos + n <= start:
            pos += n
            continue
        lo = max(0, start - pos)
        hi = min(n, start + length - pos)
        if hi > lo:
            out.append(v[lo:hi])
        pos += n
        if pos >= start + length:
            break
    return out


def _copy_into(vecs: list[memoryview], data: bytes | memoryview) -> None:
    pos = 0
    for v in vecs:
        n = len(v)
        v[:] = data[pos : pos + n]
        pos += n


def _zero_vecs(vecs: list[memoryview]) -> None:
    for v in vecs:
        n = len(v)
        pos = 0
        while pos < n:
            take = min(n - pos, len(_ZEROS))
            v[pos : pos + take] = _ZEROS[:take]
            pos += take


class QcowDisk:
    """A qcow2 image. Use :meth:`open`."""

    format_name: Final = "qcow2"
    discard_granularity: Final = 4096
    """What the guest is told (as QEMU tells it for qcow2). A discard frees only the clusters it
    covers whole and ignores the rest, which discard's advisory meaning allows."""

    def __init__(
        self,
        f: ImageFile,
        h: QcowHeader,
        l1: list[int],
        *,
        read_only: bool,
        backing: Backing | None,
    ) -> None:
        self._f = f
        self._h = h
        self._path = f.path
        self._l1 = l1
        self._read_only = read_only
        self._backing = backing
        self._bits = h.cluster_bits
        self._cs = h.cluster_size
        self._l2_bits = h.cluster_bits - 3
        self._l2_mask = (1 << self._l2_bits) - 1
        #: L2 entry bits that make a cluster other than a plain, aligned data cluster.
        self._not_plain = OFLAG_COMPRESSED | OFLAG_ZERO | (L2E_OFFSET_MASK & (self._cs - 1))
        self._lock = threading.RLock()
        self._l2_cache: dict[int, bytearray] = {}
        #: Guest cluster -> host offset of plain data clusters, for single-cluster reads
        #: without the lock. Filled under the lock; every L2 entry change drops its key.
        self._plain: dict[int, int] = {}
        self._dirty_l2: set[int] = set()
        self._dirty_l1: set[int] = set()
        self._decompressed: OrderedDict[int, bytes] = OrderedDict()
        self._file_size = f.size()
        self._closed = False
        self._corrupt = False
        self._flush_error: DiskIOError | None = None
        self._unsynced = False
        self._io_seq = 0
        self._inflight: dict[int, None] = {}
        self._pending_free: list[PendingFree] = []
        self._refs: Refcounts | None = None
        self._can_punch = True
        self.log = log.bind(image=f.path)

    # ----------------------------------------------------------------- opening

    @classmethod
    def open(cls, path: str, *, read_only: bool, allow_backing: bool = True) -> QcowDisk:
        """Open (and lock) a qcow2 image; ImageError naming the fix when it cannot be served."""
        return cls._open(path, read_only=read_only, allow_backing=allow_backing, depth=0)

    @classmethod
    def _open(cls, path: str, *, read_only: bool, allow_backing: bool, depth: int) -> QcowDisk:
        fd = open_image_file(path, read_only=read_only)
        f = ImageFile(fd, path)
        backing: Backing | None = None
        try:
            lock_image(fd, path, read_only=read_only)
            file_size = f.size()
            h = parse_header(f.pread(0, min(file_size, 1 << MAX_CLUSTER_BITS)), file_size, path)
            check_supported(h, path, writable=not read_only)
            if h.backing_file is not None:
                if not allow_backing:
                    raise ImageError(
                        f"{path} is a qcow2 image with a backing file ({h.backing_file}), and "
                        "its format was only probed: pass --format qcow2 to use the backing "
                        "file"
                    )
                backing = _open_backing(h, path, depth)
            raw_l1 = f.pread(h.l1_table_offset, 8 * h.l1_size) if h.l1_size else b""
            l1 = list(struct.unpack(f">{h.l1_size}Q", raw_l1))
            disk = cls(f, h, l1, read_only=read_only, backing=backing)
            if not read_only:
                disk._open_writable()
            return disk
        except OSError as e:
            if backing is not None:
                backing.close()
            f.close()
            raise ImageError(f"cannot use {path}: {e.strerror}") from None
        except BaseException:
            if backing is not None:
                backing.close()
            f.close()
            raise

    def _open_writable(self) -> None:
        h = self._h
        raw = self._f.pread(h.refcount_table_offset, h.refcount_table_clusters * self._cs)
        table = list(struct.unpack(f">{len(raw) // 8}Q", raw))
        refs = Refcounts(self._f, h, table, self._file_size)
        refs.meta.update(
            range(
                h.l1_table_offset >> self._bits,
                (h.l1_table_offset + 8 * h.l1_size + self._cs - 1) >> self._bits,
            )
        )
        for e in self._l1:
            off = e & L1E_OFFSET_MASK
            if off:
                refs.meta.add(off >> self._bits)
        self._refs = refs
        if h.autoclear_features or h.bitmaps is not None:
            self._drop_bitmaps(refs)

    def _drop_bitmaps(self, refs: Refcounts) -> None:
        """Persistent bitmaps would go stale under our writes. qcow2.txt: a writer that does
        not know an autoclear bit clears it; then the bitmaps are ignored (their clusters
        leak), so we also drop the extension and free the clusters, in that order."""
        h = self._h
        owned = self._bitmap_clusters(refs) if h.autoclear_features & AUTOCLEAR_BITMAPS else []
        self._f.pwrite(OFF_AUTOCLEAR_FEATURES, U64.pack(0))
        self._f.sync()
        types = h.extension_types
        if EXT_BITMAPS in types:
            first = self._f.pread(0, min(self._file_size, self._cs))
            self._f.pwrite(h.header_length, extensions_without(first, h, EXT_BITMAPS))
            self._f.sync()
            types = tuple(t for t in types if t != EXT_BITMAPS)
        self._h = replace(h, autoclear_features=0, bitmaps=None, extension_types=types)
        # Decremented at the next writeback, like every other dropped reference.
        self._pending_free += [PendingFree(self._io_seq, c << self._bits, self._cs) for c in owned]

    def _bitmap_clusters(self, refs: Refcounts) -> list[int]:
        """The clusters the bitmap directory, tables and data occupy; empty (they leak)
        unless every one is a counted, non-metadata cluster of the file named once."""
        h = self._h
        if h.bitmaps is None:
            return []
        nb, dir_size, dir_offset = h.bitmaps
        out: list[int] = []

        def add(offset: int, length: int) -> bool:
            if not length or offset % self._cs or offset + length > self._file_size:
                return False
            out.extend(range(offset >> self._bits, ((offset + length - 1) >> self._bits) + 1))
            # Each cluster may be named once, so a longer list is already invalid.
            return len(out) <= self._file_size >> self._bits

        if dir_size > _BITMAP_DIR_LIMIT or not add(dir_offset, dir_size):
            return []
        directory = self._f.pread(dir_offset, dir_size)
        pos = 0
        for _ in range(nb):
            if pos + BITMAP_DIR_ENTRY.size > len(directory):
                return []
            table_offset, table_size, _, _, _, name_size, extra = BITMAP_DIR_ENTRY.unpack_from(
                directory, pos
            )
            pos += BITMAP_DIR_ENTRY.size + extra + name_size
            pos += -pos % 8
            if table_size * 8 > _BITMAP_DIR_LIMIT or not add(table_offset, table_size * 8):
                return []
            table = self._f.pread(table_offset, table_size * 8)
            for (e,) in struct.iter_unpack(">Q", table):
                if e & L2E_OFFSET_MASK and not add(e & L2E_OFFSET_MASK, self._cs):
                    return []
        if len(set(out)) != len(out) or any(c in refs.meta or not refs.get(c) for c in out):
            return []
        return out

    # ----------------------------------------------------------------- properties

    @property
    def size(self) -> int:
        return self._h.size

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
    def header(self) -> QcowHeader:
        return self._h

    def _check(self, offset: int, length: int, write: bool) -> None:
        if self._closed:
            raise ValueError("disk is closed")
        if write and self._read_only:
            raise ValueError("write to a read-only disk")
        if offset < 0 or length < 0 or offset + length > self._h.size:
            raise ValueError(f"range {offset}+{length} outside the disk ({self._h.size} bytes)")
        if offset % SECTOR_SIZE or length % SECTOR_SIZE:
            raise ValueError(f"range {offset}+{length} is not in whole sectors")

    # ----------------------------------------------------------------- mapping

    def _l2_table(self, off: int) -> bytearray:
        table = self._l2_cache.get(off)
        if table is not None:
            return table
        if off % self._cs or off + self._cs > self._file_size:
            raise ImageCorruptError(
                f"{self._path}: L2 table at {off:#x} is unaligned or past the end of the image"
            )
        if len(self._l2_cache) * self._cs >= _L2_CACHE_LIMIT:
            for k in [k for k in self._l2_cache if k not in self._dirty_l2][
                : len(self._l2_cache) // 2
            ]:
                del self._l2_cache[k]
        table = bytearray(self._f.pread(off, self._cs))
        self._l2_cache[off] = table
        return table

    def _l2_entry(self, gc: int) -> int:
        l1e = self._l1[gc >> self._l2_bits]
        off = l1e & L1E_OFFSET_MASK
        if not off:
            return 0
        table = self._l2_table(off)
        return int(U64.unpack_from(table, (gc & self._l2_mask) * 8)[0])

    def _map(self, offset: int, length: int) -> list[list[int]]:
        """Extents ``[kind, rel, length, arg]`` covering the request (``rel`` counts from
        ``offset``); ``arg`` is the host offset (normal), guest offset (backing) or L2 entry
        (compressed). Called under the lock."""
        cs = self._cs
        out: list[list[int]] = []
        pos = offset
        end = offset + length
        backing = self._backing is not None
        while pos < end:
            in_c = pos & (cs - 1)
            take = min(cs - in_c, end - pos)
            entry = self._l2_entry(pos >> self._bits)
            if entry & OFLAG_COMPRESSED:
                kind, arg = _COMPRESSED, entry
            elif entry & OFLAG_ZERO:
                kind, arg = _ZERO, 0
            else:
                host = entry & L2E_OFFSET_MASK
                if host:
                    if host & (cs - 1):
                        raise ImageCorruptError(
                            f"{self._path}: data cluster offset {host:#x} is unaligned"
                        )
                    kind, arg = _NORMAL, host + in_c
                elif backing:
                    kind, arg = _BACKING, pos
                else:
                    kind, arg = _ZERO, 0
            if out and kind != _COMPRESSED:
                last = out[-1]
                if last[0] == kind and (kind == _ZERO or last[3] + last[2] == arg):
                    last[2] += take
                    pos += take
                    continue
            out.append([kind, pos - offset, take, arg])
            pos += take
        return out

    def _begin_io(self) -> int:
        seq = self._io_seq
        self._io_seq += 1
        self._inflight[seq] = None
        return seq

    def _end_io(self, seq: int, wrote: bool = False) -> None:
        with self._lock:
            del self._inflight[seq]
            if wrote:
                # Set only now: a flush that ran while this write was in flight must not
                # make the next flush skip its fdatasync.
                self._unsynced = True

    # ----------------------------------------------------------------- reads

    def read(self, offset: int, buffers: IoBuffers) -> None:
        n = len(buffers)
        self._check(offset, n, write=False)
        if n == 0:
            return
        gc = offset >> self._bits
        if (offset + n - 1) >> self._bits == gc:
            host = self._plain.get(gc, -1)
            if host < 0:
                with self._lock:
                    host = self._contiguous_host(offset & -self._cs, self._cs, 0)
                    if host >= 0 and len(self._plain) < _PLAIN_MAP_LIMIT:
                        self._plain[gc] = host
            if host >= 0:
                with buffers.lock(True) as locked:
                    self._f.preadv(locked.io_vecs(), host + (offset & (self._cs - 1)), n)
                return
        with buffers.lock(True) as locked:
            vecs = locked.io_vecs()
            host = self._contiguous_host(offset, n, 0)
            if host >= 0:
                self._f.preadv(vecs, host, n)
            else:
                self.read_vecs(offset, vecs)

    def _contiguous_host(self, offset: int, length: int, need: int) -> int:
        """The host offset of guest bytes ``[offset, offset+length)`` when they lie in normal
        clusters, contiguous in the file, whose L2 tables are cached and whose entries carry
        the flags ``need``; else -1 (take the general path).

        Reads use this without the metadata lock: a cached table is the live one, and one
        entry is read by a single C call. A read racing the guest's own discard or write of the
        same range may see old or new data, as the guest must expect anyway; it never writes.
        """
        bits = self._bits
        gc = offset >> bits
        last = (offset + length - 1) >> bits
        if gc == last:
            # One cluster: the common case, kept short.
            table = self._l2_cache.get(self._l1[gc >> self._l2_bits] & L1E_OFFSET_MASK)
            if table is None:
                return -1
            entry = _unpack_u64(table, (gc & self._l2_mask) << 3)[0]
            host = entry & L2E_OFFSET_MASK
            if entry & self._not_plain or not host or entry & need != need:
                return -1
            return int(host + (offset & (self._cs - 1)))
        cs_mask = self._cs - 1
        expected = -1
        start = -1
        while gc <= last:
            table = self._l2_cache.get(self._l1[gc >> self._l2_bits] & L1E_OFFSET_MASK)
            if table is None:
                return -1
            entry = _unpack_u64(table, (gc & self._l2_mask) << 3)[0]
            host = entry & L2E_OFFSET_MASK
            if (
                entry & (OFLAG_COMPRESSED | OFLAG_ZERO)
                or not host
                or host & cs_mask
                or entry & need != need
            ):
                return -1
            if start < 0:
                start = host + (offset & cs_mask)
            elif host != expected:
                return -1
            expected = host + self._cs
            gc += 1
        return int(start)

    def read_vecs(self, offset: int, vecs: list[memoryview]) -> None:
        """Read ``sum(len(v))`` bytes at ``offset`` into ``vecs`` (any byte alignment)."""
        length = sum(len(v) for v in vecs)
        with self._lock:
            extents = self._map(offset, length)
            seq = self._begin_io()
        try:
            if len(extents) == 1 and extents[0][0] == _NORMAL:
                self._f.preadv(vecs, extents[0][3])
                return
            for kind, rel, n, arg in extents:
                part = _slice_vecs(vecs, rel, n)
                if kind == _NORMAL:
                    self._f.preadv(part, arg)
                elif kind == _ZERO:
                    _zero_vecs(part)
                elif kind == _BACKING:
                    self._read_backing(arg, n, part)
                else:
                    data = self._decompress(arg)
                    in_c = (offset + rel) & (self._cs - 1)
                    _copy_into(part, memoryview(data)[in_c : in_c + n])
        finally:
            self._end_io(seq)

    def _read_backing(self, offset: int, length: int, vecs: list[memoryview]) -> None:
        backing = self._backing
        assert backing is not None
        inside = max(0, min(length, backing.size - offset))
        if inside:
            backing.read_vecs(offset, _slice_vecs(vecs, 0, inside))
        if inside < length:
            _zero_vecs(_slice_vecs(vecs, inside, length - inside))

    def _decompress(self, entry: int) -> bytes:
        with self._lock:
            cached = self._decompressed.get(entry)
            if cached is not None:
                self._decompressed.move_to_end(entry)
                return cached
        h = self._h
        coff = entry & h.cluster_offset_mask
        nb = ((entry >> h.csize_shift) & h.csize_mask) + 1
        csize = nb * SECTOR_SIZE - (coff & (SECTOR_SIZE - 1))
        # The stream may end short of the sectors it names (QEMU reads past the end of the
        # file as zeros); it may not start past the end.
        if coff >= self._file_size:
            raise ImageCorruptError(
                f"{self._path}: compressed cluster at {coff:#x} lies past the end of the image"
            )
        data = decompress_cluster(self._f.pread(coff, csize), self._cs, h.compression_type)
        with self._lock:
            self._decompressed[entry] = data
            while len(self._decompressed) > _DECOMPRESSED_CACHE:
                self._decompressed.popitem(last=False)
        return data

    # ----------------------------------------------------------------- writes

    def write(self, offset: int, buffers: IoBuffers) -> None:
        n = len(buffers)
        self._check(offset, n, write=True)
        if n == 0:
            return
        with buffers.lock(False) as locked:
            self._write_vecs(offset, list(locked.io_vecs()))

    def _writable(self) -> Refcounts:
        if self._corrupt:
            raise ImageCorruptError(
                f"{self._path} was marked corrupt; check it with `qemu-img check {self._path}`"
            )
        if self._flush_error is not None:
            raise self._flush_error
        assert self._refs is not None
        return self._refs

    def _write_vecs(self, offset: int, vecs: list[memoryview]) -> None:
        length = sum(len(v) for v in vecs)
        with self._lock:
            refs = self._writable()
            host = self._contiguous_host(offset, length, OFLAG_COPIED)
            if host < 0:
                self._write_allocating(refs, offset, vecs, length)
                self._maybe_writeback()
                return
            # Allocated clusters only this image references: write in place, outside the
            # lock. The sequence number keeps them from being reused until this write ends.
            self._check_target(refs, host, length)
            seq = self._begin_io()
        try:
            self._f.pwritev(vecs, host)
        finally:
            self._end_io(seq, wrote=True)

    def _check_target(self, refs: Refcounts, host: int, length: int) -> None:
        """Overlap check (QEMU's qcow2_check_metadata_overlap): a data write must not land on
        metadata or past what the image has allocated."""
        first = host >> self._bits
        last = (host + length - 1) >> self._bits
        limit = max(refs.end, -(-self._file_size // self._cs))
        for c in range(first, last + 1):
            if c in refs.meta or c >= limit:
                self._signal_corruption(
                    f"data write to host offset {host:#x} would overwrite metadata"
                    if c in refs.meta
                    else f"data cluster {c << self._bits:#x} lies past the end of the image"
                )

    def _signal_corruption(self, why: str) -> None:
        self._corrupt = True
        self.log.error("image corrupt; marked", reason=why)
        if not self._read_only:
            try:
                flags = self._h.incompatible_features | INCOMPAT_CORRUPT
                self._f.pwrite(OFF_INCOMPATIBLE_FEATURES, U64.pack(flags))
                self._f.sync()
            except DiskIOError:
                pass
        raise ImageCorruptError(
            f"{self._path}: {why}; the image is marked corrupt: check it with "
            f"`qemu-img check {self._path}`"
        )

    def _write_allocating(
        self, refs: Refcounts, offset: int, vecs: list[memoryview], length: int
    ) -> None:
        cs = self._cs
        pos = offset
        end = offset + length
        while pos < end:
            in_c = pos & (cs - 1)
            take = min(cs - in_c, end - pos)
            gc = pos >> self._bits
            part = _slice_vecs(vecs, pos - offset, take)
            entry = self._l2_entry(gc)
            host = entry & L2E_OFFSET_MASK
            normal = not entry & (OFLAG_COMPRESSED | OFLAG_ZERO) and host
            if normal and (entry & OFLAG_COPIED or refs.get(host >> self._bits) == 1):
                if host & (cs - 1):
                    raise ImageCorruptError(f"{self._path}: data offset {host:#x} unaligned")
                self._check_target(refs, host + in_c, take)
                self._f.pwritev(part, host + in_c)
                if not entry & OFLAG_COPIED:
                    self._set_l2(gc, entry | OFLAG_COPIED)
            else:
                self._allocate_and_write(refs, gc, entry, in_c, part, take)
            self._unsynced = True
            pos += take

    def _allocate_and_write(
        self, refs: Refcounts, gc: int, entry: int, in_c: int, part: list[memoryview], take: int
    ) -> None:
        cs = self._cs
        host = entry & L2E_OFFSET_MASK
        reuse = (
            not entry & OFLAG_COMPRESSED
            and entry & OFLAG_ZERO
            and host
            and not host & (cs - 1)
            and (entry & OFLAG_COPIED or refs.get(host >> self._bits) == 1)
        )
        self._writable_l2(refs, gc >> self._l2_bits)
        if reuse:
            target = host
            self._check_target(refs, target, cs)
        else:
            target = refs.allocate(1)
        if take == cs:
            self._f.pwritev(part, target)
        else:
            base = self._cluster_content(gc, entry)
            self._f.pwritev(
                [base[:in_c], *part, base[in_c + take :]],
                target,
            )
        self._set_l2(gc, target | OFLAG_COPIED)
        if not reuse:
            self._release(entry)

    def _cluster_content(self, gc: int, entry: int) -> memoryview:
        """What guest cluster ``gc`` reads as now (for a partial write's fill)."""
        cs = self._cs
        if entry & OFLAG_COMPRESSED:
            return memoryview(self._decompress(entry))
        host = entry & L2E_OFFSET_MASK
        if entry & OFLAG_ZERO:
            return memoryview(_ZEROS)[:cs]
        buf = bytearray(cs)
        if host:
            self._f.preadv([memoryview(buf)], host)
        elif self._backing is not None:
            self._read_backing(
                gc << self._bits, min(cs, self._h.size - (gc << self._bits)), [memoryview(buf)]
            )
        return memoryview(buf)

    def _writable_l2(self, refs: Refcounts, l1i: int) -> bytearray:
        """The L2 table of L1 entry ``l1i``, allocated if missing; ours to modify."""
        l1e = self._l1[l1i]
        off = l1e & L1E_OFFSET_MASK
        if off:
            table = self._l2_table(off)
            if not l1e & OFLAG_COPIED:
                if refs.get(off >> self._bits) != 1:
                    self._signal_corruption(f"L2 table at {off:#x} is shared (no snapshots)")
                self._l1[l1i] = off | OFLAG_COPIED
                self._dirty_l1.add(l1i)
            return table
        new = refs.allocate(1)
        refs.meta.add(new >> self._bits)
        table = bytearray(self._cs)
        self._l2_cache[new] = table
        self._dirty_l2.add(new)
        self._l1[l1i] = new | OFLAG_COPIED
        self._dirty_l1.add(l1i)
        return table

    def _set_l2(self, gc: int, entry: int) -> None:
        off = self._l1[gc >> self._l2_bits] & L1E_OFFSET_MASK
        table = self._l2_table(off)
        U64.pack_into(table, (gc & self._l2_mask) * 8, entry)
        self._plain.pop(gc, None)
        self._dirty_l2.add(off)

    def _release(self, entry: int) -> None:
        """Queue the host bytes of an L2 entry that no longer references them."""
        h = self._h
        if entry & OFLAG_COMPRESSED:
            coff = entry & h.cluster_offset_mask
            nb = ((entry >> h.csize_shift) & h.csize_mask) + 1
            start = coff & ~(SECTOR_SIZE - 1)
            self._pending_free.append(PendingFree(self._io_seq, start, nb * SECTOR_SIZE))
            return
        host = entry & L2E_OFFSET_MASK
        if host:
            self._pending_free.append(PendingFree(self._io_seq, host, self._cs))

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
        cs = self._cs
        end = offset + length
        first_full = -(-offset // cs) * cs
        last_full = end // cs * cs
        with self._lock:
            refs = self._writable()
            if exact:
                # Partial clusters at either edge must read as zeros afterwards.
                if first_full > offset:
                    self._zero_partial(refs, offset, min(first_full, end) - offset)
                if last_full < end and last_full >= first_full:
                    self._zero_partial(refs, last_full, end - last_full)
            for gc in range(first_full >> self._bits, last_full >> self._bits):
                self._zero_cluster(refs, gc, unmap=unmap)
            self._maybe_writeback()

    def _zero_partial(self, refs: Refcounts, offset: int, length: int) -> None:
        """Make ``[offset, offset+length)``, inside one cluster, read as zeros. Nothing to do
        where it already does (a zero cluster; unallocated without a backing file or over
        zeros in it); an allocated cluster gets zeros in place (``_write_allocating`` keeps
        a cluster only this image references); only what shows other content (compressed, a
        backing file's data) needs a new cluster."""
        entry = self._l2_entry(offset >> self._bits)
        if not entry & OFLAG_COMPRESSED:
            if entry & OFLAG_ZERO:
                return
            if not entry & L2E_OFFSET_MASK:
                if self._backing is None:
                    return
                buf = bytearray(length)
                self._read_backing(offset, length, [memoryview(buf)])
                if buf == _ZEROS[:length]:
                    return
        self._write_allocating(refs, offset, [memoryview(_ZEROS)[:length]], length)

    def _zero_cluster(self, refs: Refcounts, gc: int, *, unmap: bool) -> None:
        entry = self._l2_entry(gc)
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
            and not host & (self._cs - 1)
        ):
            # Keep the allocation (the guest asked not to unmap); the zero flag hides the data.
            new = host | OFLAG_COPIED | OFLAG_ZERO
            if new != entry:
                self._writable_l2(refs, gc >> self._l2_bits)
                self._set_l2(gc, new)
            return
        self._writable_l2(refs, gc >> self._l2_bits)
        # Where a backing file would show through, only the zero flag makes the cluster read
        # as zeros; without one an unallocated cluster already does.
        self._set_l2(gc, OFLAG_ZERO if backing else 0)
        self._release(entry)

    # ----------------------------------------------------------------- flush

    def flush(self) -> None:
        if self._closed:
            raise ValueError("disk is closed")
        if self._read_only:
            return
        with self._lock:
            if self._flush_error is not None:
                raise self._flush_error
            self._writeback()

    def _maybe_writeback(self) -> None:
        refs = self._refs
        assert refs is not None
        dirty = (len(self._dirty_l2) + len(refs.dirty_blocks)) * self._cs
        if dirty > _DIRTY_LIMIT or len(self._pending_free) > _PENDING_FREE_LIMIT:
            self._writeback()

    def _writeback(self) -> None:
        """Write dirty metadata back in crash-safe order (see ``alloc``); under the lock."""
        refs = self._refs
        assert refs is not None
        try:
            self._writeback_steps(refs)
        except DiskIOError as e:
            self._flush_error = DiskIOError(
                f"writing back {self._path} failed ({e}); the image is consistent on disk "
                "but writes since the last flush may be lost: reopen it",
                e.errno,
            )
            self.log.error("flush failed", errno=e.errno)
            raise self._flush_error from e

    def _writeback_steps(self, refs: Refcounts) -> None:
        f = self._f
        # 1. Refcount blocks (and a moved refcount table), with the data written so far.
        if refs.write_blocks() or self._unsynced:
            f.sync()
        self._unsynced = False
        # 2. What points at refcount blocks.
        if refs.table_moved:
            f.pwrite(
                OFF_REFCOUNT_TABLE_OFFSET, _REFT_FIELDS.pack(refs.table_offset, refs.table_clusters)
            )
            f.sync()
            refs.table_moved = False
            for off, clusters in refs.old_tables:
                self._pending_free.append(PendingFree(self._io_seq, off, clusters * self._cs))
            refs.old_tables.clear()
        elif refs.write_table_entries():
            f.sync()
        # 3. L2 tables.
        if self._dirty_l2:
            for off in sorted(self._dirty_l2):
                f.pwrite(off, self._l2_cache[off])
            self._dirty_l2.clear()
            f.sync()
        # 4. L1 entries.
        if self._dirty_l1:
            for i in sorted(self._dirty_l1):
                f.pwrite(self._h.l1_table_offset + 8 * i, U64.pack(self._l1[i]))
            self._dirty_l1.clear()
            f.sync()
        self._file_size = max(self._file_size, f.size())
        # 5. Frees whose dropped references are now durable, unless an I/O that started
        # before the free could still be using the cluster.
        oldest = next(iter(self._inflight), self._io_seq)
        ready = [p for p in self._pending_free if p.stamp <= oldest]
        if not ready:
            return
        self._pending_free = [p for p in self._pending_free if p.stamp > oldest]
        freed: list[int] = []
        for p in ready:
            freed += refs.decrement(p.offset, p.length)
        if refs.write_blocks():
            f.sync()
        self._punch(sorted(freed))

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
                    self._f.fd,
                    FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                    clusters[i] << self._bits,
                    (j - i + 1) << self._bits,
                )
            except OSError as e:
                self._can_punch = False
                self.log.debug("cannot punch holes; freed clusters keep their space", errno=e.errno)
            i = j + 1

    # ----------------------------------------------------------------- close

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                if not self._read_only and not self._corrupt and self._flush_error is None:
                    self._writeback()
            except DiskIOError:
                pass  # logged by _writeback; closing must still release the image
            finally:
                self._closed = True
                if self._backing is not None:
                    self._backing.close()
                self._f.close()


def _open_backing(h: QcowHeader, path: str, depth: int) -> Backing:
    name = h.backing_file
    assert name is not None
    if depth + 1 >= MAX_BACKING_DEPTH:
        raise ImageError(
            f"{path}: backing chain longer than {MAX_BACKING_DEPTH} images (a loop?): "
            f"flatten it with `qemu-img convert -O qcow2 {path} NEW.qcow2`"
        )
    full = name if os.path.isabs(name) else os.path.join(os.path.dirname(path) or ".", name)
    fmt = h.backing_format
    if fmt is None:
        raise ImageError(
            f"{path} does not name the format of its backing file {name} (it is never "
            f"guessed): set it with `qemu-img rebase -u -b {name} -F qcow2|raw {path}`"
        )
    if fmt not in ("raw", "qcow2"):
        raise UnsupportedImageError(
            f"{path} has a backing file in format {fmt!r}; only raw and qcow2 are supported: "
            f"convert the backing file with `qemu-img convert -O qcow2 {full} NEW.qcow2`"
        )
    if not os.path.exists(full):
        raise ImageError(
            f"the backing file {full} of {path} does not exist: restore it or point the "
            f"image at it with `qemu-img rebase -u -b NEWPATH -F {fmt} {path}`"
        )
    try:
        if fmt == "raw":
            return RawBacking.open(full)
        return QcowDisk._open(full, read_only=True, allow_backing=True, depth=depth + 1)
    except ImageError as e:
        raise type(e)(f"backing file of {path}: {e}") from None
