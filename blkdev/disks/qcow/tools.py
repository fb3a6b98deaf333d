"""Image tools: create, info and check (the qemu-img subset the CLI offers)."""

from __future__ import annotations

import os
import struct
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Final

from blkdev.disks.disk import SECTOR_SIZE
from blkdev.disks.hostfile import ImageFile, lock_image, open_image_file
from blkdev.disks.qcow.alloc import get_refcount
from blkdev.disks.qcow.header import (
    AUTOCLEAR_BITMAPS,
    BITMAP_DIR_ENTRY,
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSION_NAMES,
    EXT_BACKING_FORMAT,
    EXT_END,
    EXTENSION,
    HEADER_V2,
    HEADER_V3_EXTRA,
    HEADER_V3_OWN_SIZE,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    INCOMPAT_EXTL2,
    L1E_OFFSET_MASK,
    L1E_RESERVED,
    L2E_OFFSET_MASK,
    L2E_STD_RESERVED,
    MAGIC,
    MAX_CLUSTER_BITS,
    MIN_CLUSTER_BITS,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    REFT_OFFSET_MASK,
    REFT_RESERVED,
    QcowHeader,
    l1_entries_needed,
    parse_header,
)
from blkdev.errors import ImageError

_SNAPSHOT: Final = struct.Struct(">QIHHIIQII")
#: QEMU's limits on the snapshot table (block/qcow2.h).
_MAX_SNAPSHOTS: Final = 65536
_MAX_SNAPSHOT_EXTRA: Final = 1024
_MAX_SNAPSHOTS_BYTES: Final = 64 << 20


# ----------------------------------------------------------------------------- create


def create_image(
    path: str,
    size: int,
    *,
    cluster_size: int = 65536,
    backing_file: str | None = None,
    backing_format: str | None = None,
) -> None:
    """Create an empty qcow2 v3 image (refcount order 4, zlib), like ``qemu-img create``."""
    bits = cluster_size.bit_length() - 1
    if cluster_size != 1 << bits or not MIN_CLUSTER_BITS <= bits <= MAX_CLUSTER_BITS:
        raise ValueError(f"cluster size {cluster_size} is not a power of two in 512..2M")
    if size < 0:
        raise ValueError(f"negative size {size}")
    size = -(-size // SECTOR_SIZE) * SECTOR_SIZE
    if backing_file is not None and backing_format not in ("raw", "qcow2"):
        raise ImageError(
            f"name the format of the backing file {backing_file} (raw or qcow2) with "
            "--backing-format: it is never guessed"
        )
    l1_size = l1_entries_needed(size, bits)
    if l1_size * 8 > 32 << 20:
        raise ValueError(f"size {size} is too large for {cluster_size}-byte clusters")
    l1_clusters = -(-l1_size * 8 // cluster_size)
    per_block = cluster_size // 2
    blocks = reftable = 1
    while True:
        total = 1 + reftable + blocks + l1_clusters
        need_blocks = -(-total // per_block)
        need_table = -(-need_blocks * 8 // cluster_size)
        if (need_blocks, need_table) == (blocks, reftable):
            break
        blocks, reftable = need_blocks, need_table

    reftable_off = cluster_size
    blocks_off = reftable_off + reftable * cluster_size
    l1_off = blocks_off + blocks * cluster_size
    header = bytearray(cluster_size)
    exts = bytearray()
    if backing_format is not None and backing_file is not None:
        name = backing_format.encode()
        exts += EXTENSION.pack(EXT_BACKING_FORMAT, len(name)) + name
        exts += bytes(-len(exts) % 8)
    exts += EXTENSION.pack(EXT_END, 0)
    backing_off = backing_len = 0
    if backing_file is not None:
        raw_name = os.fsencode(backing_file)
        backing_off = HEADER_V3_OWN_SIZE + len(exts)
        backing_len = len(raw_name)
        if backing_len > 1023 or backing_off + backing_len > cluster_size:
            raise ValueError(f"backing file name {backing_file!r} is too long")
        header[backing_off : backing_off + backing_len] = raw_name
    HEADER_V2.pack_into(
        header,
        0,
        MAGIC,
        3,
        backing_off,
        backing_len,
        bits,
        size,
        0,
        l1_size,
        l1_off,
        reftable_off,
        reftable,
        0,
        0,
    )
    HEADER_V3_EXTRA.pack_into(header, 72, 0, 0, 0, 4, HEADER_V3_OWN_SIZE)
    header[HEADER_V3_OWN_SIZE : HEADER_V3_OWN_SIZE + len(exts)] = exts

    table = bytearray(reftable * cluster_size)
    for i in range(blocks):
        struct.pack_into(">Q", table, 8 * i, blocks_off + i * cluster_size)
    counts = bytearray(blocks * cluster_size)
    for c in range(total):
        struct.pack_into(">H", counts, 2 * c, 1)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        raise ImageError(f"{path} exists: remove it first or choose another name") from None
    except OSError as e:
        raise ImageError(f"cannot create {path}: {e.strerror}") from None
    try:
        os.pwrite(fd, header, 0)
        os.pwrite(fd, table, reftable_off)
        os.pwrite(fd, counts, blocks_off)
        os.ftruncate(fd, l1_off + l1_clusters * cluster_size)
        os.fsync(fd)
    except OSError as e:
        os.close(fd)
        os.unlink(path)
        raise ImageError(f"cannot write {path}: {e.strerror}") from None
    os.close(fd)


# ----------------------------------------------------------------------------- info


def _read_header(path: str, *, lock: bool) -> tuple[ImageFile, QcowHeader]:
    fd = open_image_file(path, read_only=True)
    f = ImageFile(fd, path)
    try:
        if lock:
            lock_image(fd, path, read_only=True)
        size = f.size()
        h = parse_header(f.pread(0, min(size, 1 << MAX_CLUSTER_BITS)), size, path)
        return f, h
    except BaseException:
        f.close()
        raise


def image_info(path: str) -> dict[str, Any]:
    """``qemu-img info --output=json`` fields that apply. Does not lock (like ``-U``), so it
    works on an image being served."""
    f, h = _read_header(path, lock=False)
    try:
        st = os.fstat(f.fd)
        snapshots = _snapshot_list(f, h)
    finally:
        f.close()
    info: dict[str, Any] = {}
    if snapshots:
        info["snapshots"] = snapshots
    info |= {
        "virtual-size": h.size,
        "filename": path,
        "cluster-size": h.cluster_size,
        "format": "qcow2",
        "actual-size": st.st_blocks * 512,
    }
    if h.version == 2:
        data: dict[str, Any] = {"compat": "0.10", "compression-type": "zlib", "refcount-bits": 16}
    else:
        data = {
            "compat": "1.1",
            "compression-type": COMPRESSION_NAMES.get(h.compression_type, str(h.compression_type)),
            "lazy-refcounts": bool(h.compatible_features & COMPAT_LAZY_REFCOUNTS),
            "refcount-bits": h.refcount_bits,
            "corrupt": bool(h.incompatible_features & INCOMPAT_CORRUPT),
            "extended-l2": bool(h.incompatible_features & INCOMPAT_EXTL2),
        }
    info["format-specific"] = {"type": "qcow2", "data": data}
    if h.backing_file is not None:
        info["backing-filename"] = h.backing_file
        info["full-backing-filename"] = (
            h.backing_file
            if os.path.isabs(h.backing_file)
            else os.path.join(os.path.dirname(path), h.backing_file)
        )
        if h.backing_format is not None:
            info["backing-filename-format"] = h.backing_format
    info["dirty-flag"] = bool(h.incompatible_features & INCOMPAT_DIRTY)
    return info


def _snapshot_list(f: ImageFile, h: QcowHeader) -> list[dict[str, Any]]:
    """The internal snapshots as ``qemu-img info`` lists them (its key order); empty when
    there are none or the table is unreadable (QEMU's limits; info stays advisory)."""
    if not h.nb_snapshots or h.nb_snapshots > _MAX_SNAPSHOTS:
        return []
    file_size = f.size()
    out: list[dict[str, Any]] = []
    pos = h.snapshots_offset
    for _ in range(h.nb_snapshots):
        if pos + _SNAPSHOT.size > file_size or pos - h.snapshots_offset > _MAX_SNAPSHOTS_BYTES:
            return []
        (_, _, id_len, name_len, date_sec, date_nsec, vm_clock, vm_state, extra_len) = (
            _SNAPSHOT.unpack(f.pread(pos, _SNAPSHOT.size))
        )
        pos += _SNAPSHOT.size
        if extra_len > _MAX_SNAPSHOT_EXTRA or pos + extra_len + id_len + name_len > file_size:
            return []
        extra = f.pread(pos, extra_len)
        pos += extra_len
        names = f.pread(pos, id_len + name_len)
        pos += id_len + name_len
        pos += -pos % 8
        if extra_len >= 8:
            vm_state = struct.unpack_from(">Q", extra, 0)[0]
        entry: dict[str, Any] = {}
        if extra_len >= 24:
            icount = struct.unpack_from(">Q", extra, 16)[0]
            if icount != (1 << 64) - 1:  # -1: no instruction count recorded
                entry["icount"] = icount
        entry |= {
            "vm-clock-nsec": vm_clock % 1_000_000_000,
            "name": names[id_len:].decode("utf-8", "replace"),
            "date-sec": date_sec,
            "date-nsec": date_nsec,
            "vm-clock-sec": vm_clock // 1_000_000_000,
            "id": names[:id_len].decode("utf-8", "replace"),
            "vm-state-size": vm_state,
        }
        out.append(entry)
    return out


# ----------------------------------------------------------------------------- check


@dataclass
class CheckResult:
    filename: str
    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    image_end_offset: int = 0
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "image-end-offset": self.image_end_offset,
            "total-clusters": self.total_clusters,
            "check-errors": self.check_errors,
            "allocated-clusters": self.allocated_clusters,
            "filename": self.filename,
            "format": "qcow2",
        }
        if self.corruptions:
            out["corruptions"] = self.corruptions
        if self.leaks:
            out["leaks"] = self.leaks
        if self.fragmented_clusters:
            out["fragmented-clusters"] = self.fragmented_clusters
        if self.compressed_clusters:
            out["compressed-clusters"] = self.compressed_clusters
        return out


class _Checker:
    def __init__(self, f: ImageFile, h: QcowHeader, result: CheckResult) -> None:
        self.f = f
        self.h = h
        self.r = result
        self.cs = h.cluster_size
        self.bits = h.cluster_bits
        self.file_size = f.size()
        self.nb_clusters = -(-self.file_size // self.cs)
        self.refs: Counter[int] = Counter()
        self.stored: dict[int, int] = {}
        self.copied_checks: list[tuple[int, bool, str]] = []

    def corruption(self, msg: str) -> None:
        self.r.corruptions += 1
        self.r.problems.append(f"ERROR {msg}")

    def inc(self, offset: int, length: int, what: str) -> bool:
        if length <= 0:
            return True
        first = offset >> self.bits
        last = (offset + length - 1) >> self.bits
        if last >= self.nb_clusters:
            self.corruption(f"{what} at {offset:#x} (+{length}) lies past the end of the file")
            return False
        for c in range(first, last + 1):
            self.refs[c] += 1
        return True

    def load_refcounts(self) -> None:
        h = self.h
        raw = self.f.pread(h.refcount_table_offset, h.refcount_table_clusters * self.cs)
        per_block = self.cs * 8 // h.refcount_bits
        for bi, (entry,) in enumerate(struct.iter_unpack(">Q", raw)):
            off = entry & REFT_OFFSET_MASK
            if entry & REFT_RESERVED:
                # Like QEMU: a corruption, and the block's own cluster is not counted as
                # referenced (so it also shows as a leak), but its refcounts are still read.
                self.corruption(f"refcount table entry {bi} has reserved bits set")
                if off and not off % self.cs and off < self.file_size:
                    self.load_block(bi, off, per_block)
                continue
            if not off:
                continue
            if off % self.cs:
                self.corruption(
                    f"refcount block {bi} is not cluster aligned; refcount table entry corrupted"
                )
                continue
            if off >= self.file_size:
                self.corruption(f"refcount block {bi} is outside image")
                continue
            self.inc(off, self.cs, f"refcount block {bi}")
            self.load_block(bi, off, per_block)

    def load_block(self, bi: int, off: int, per_block: int) -> None:
        order = self.h.refcount_order
        block = self.f.pread(off, self.cs)
        base = bi * per_block
        if order == 4:
            values = array("H", block)
            values.byteswap()
            for j, v in enumerate(values):
                if v:
                    self.stored[base + j] = v
        else:
            for j in range(per_block):
                v = get_refcount(block, j, order)
                if v:
                    self.stored[base + j] = v

    def stored_refcount(self, offset: int) -> int:
        return self.stored.get(offset >> self.bits, 0)

    def walk_l1(self, l1_offset: int, l1_size: int, *, active: bool) -> None:
        h = self.h
        if not self.inc(l1_offset, l1_size * 8, "L1 table"):
            return
        raw = self.f.pread(l1_offset, l1_size * 8)
        for i, (l1e,) in enumerate(struct.iter_unpack(">Q", raw)):
            if l1e & L1E_RESERVED:
                self.corruption(f"found L1 entry with reserved bits set: {l1e:x}")
            l2off = l1e & L1E_OFFSET_MASK
            if not l2off:
                if l1e and not l1e & L1E_RESERVED:
                    # qemu-img reads the header as this L2 table and counts it twice.
                    self.corruption(f"L1 entry {i} ({l1e:x}) has flags but no L2 table offset")
                continue
            if l2off % self.cs:
                self.corruption(f"L2 table offset {l2off:#x} (L1 index {i}) is unaligned")
                continue
            if not self.inc(l2off, self.cs, f"L2 table (L1 index {i})"):
                continue
            if active:
                self.copied_checks.append((l2off, bool(l1e & OFLAG_COPIED), f"L1 index {i}"))
            table = self.f.pread(l2off, self.cs)
            # QEMU counts fragmentation within each L2 table.
            last_host = -1
            for j, (e,) in enumerate(struct.iter_unpack(">Q", table)):
                if not e:
                    continue
                where = f"L2 entry {j} of table {l2off:#x}"
                if not e & OFLAG_COMPRESSED and e & L2E_STD_RESERVED:
                    self.corruption(f"found l2 entry with reserved bits set: {e:x} ({where})")
                if e & OFLAG_COMPRESSED:
                    if e & OFLAG_COPIED:
                        self.corruption(f"{where}: compressed cluster has the COPIED flag set")
                    coff = e & h.cluster_offset_mask
                    nb = ((e >> h.csize_shift) & h.csize_mask) + 1
                    if self.inc(coff & ~(SECTOR_SIZE - 1), nb * SECTOR_SIZE, where) and active:
                        self.r.allocated_clusters += 1
                        self.r.compressed_clusters += 1
                        # qemu-img: compressed clusters are fragmented by nature.
                        self.r.fragmented_clusters += 1
                    continue
                host = e & L2E_OFFSET_MASK
                if not host:
                    continue
                if host % self.cs:
                    self.corruption(f"{where}: cluster offset {host:#x} is unaligned")
                    continue
                if not self.inc(host, self.cs, where):
                    continue
                if active:
                    self.copied_checks.append((host, bool(e & OFLAG_COPIED), where))
                    self.r.allocated_clusters += 1
                    if last_host >= 0 and host != last_host + self.cs:
                        self.r.fragmented_clusters += 1
                    last_host = host

    def walk_snapshots(self) -> None:
        h = self.h
        pos = h.snapshots_offset
        start = pos
        for n in range(h.nb_snapshots):
            if pos + _SNAPSHOT.size > self.file_size:
                self.corruption(f"snapshot table entry {n} lies past the end of the file")
                return
            l1_off, l1_size, id_len, name_len, _, _, _, _, extra = _SNAPSHOT.unpack(
                self.f.pread(pos, _SNAPSHOT.size)
            )
            pos += _SNAPSHOT.size + extra + id_len + name_len
            pos += -pos % 8
            if l1_off % self.cs or l1_size * 8 > 32 << 20:
                self.corruption(f"snapshot {n} has an invalid L1 table")
                continue
            self.walk_l1(l1_off, l1_size, active=False)
        self.inc(start, pos - start, "snapshot table")

    def walk_bitmaps(self) -> None:
        """Persistent bitmaps own clusters too; QEMU counts them only while the autoclear
        bit says they are valid."""
        assert self.h.bitmaps is not None
        nb, dir_size, dir_offset = self.h.bitmaps
        if dir_size > 64 << 20 or not self.inc(dir_offset, dir_size, "bitmap directory"):
            return
        directory = self.f.pread(dir_offset, dir_size)
        pos = 0
        for n in range(nb):
            if pos + BITMAP_DIR_ENTRY.size > len(directory):
                self.corruption(f"bitmap directory entry {n} runs past the directory")
                return
            table_offset, table_size, _, _, _, name_size, extra = BITMAP_DIR_ENTRY.unpack_from(
                directory, pos
            )
            pos += BITMAP_DIR_ENTRY.size + extra + name_size
            pos += -pos % 8
            if not self.inc(table_offset, table_size * 8, f"bitmap table {n}"):
                continue
            for (e,) in struct.iter_unpack(">Q", self.f.pread(table_offset, table_size * 8)):
                off = e & L2E_OFFSET_MASK
                if off:
                    self.inc(off, self.cs, f"bitmap {n} data")

    def run(self) -> None:
        h = self.h
        self.r.total_clusters = -(-h.size // self.cs)
        self.inc(0, self.cs, "header")
        self.walk_l1(h.l1_table_offset, h.l1_size, active=True)
        if h.nb_snapshots:
            self.walk_snapshots()
        if h.bitmaps is not None and h.autoclear_features & AUTOCLEAR_BITMAPS:
            self.walk_bitmaps()
        self.inc(h.refcount_table_offset, h.refcount_table_clusters * self.cs, "refcount table")
        self.load_refcounts()
        for off, copied, where in self.copied_checks:
            rc = self.stored_refcount(off)
            if (rc == 1) != copied:
                self.corruption(f"OFLAG_COPIED {where}: refcount={rc} copied={copied}")
        end = 0
        for c in sorted(set(self.refs) | set(self.stored)):
            ref = self.refs.get(c, 0)
            rc = self.stored.get(c, 0)
            if c >= self.nb_clusters and not ref:
                # Counted but past the end of the file (a crash after the refcount block
                # was written, before the data): qemu-img walks only the file's clusters.
                continue
            end = c + 1
            if ref == rc:
                continue
            if rc < ref:
                self.corruption(f"cluster {c} refcount={rc} reference={ref}")
            else:
                self.r.leaks += 1
                self.r.problems.append(f"Leaked cluster {c} refcount={rc} reference={ref}")
        self.r.image_end_offset = end * self.cs


def check_image(path: str) -> CheckResult:
    """Walk every reference in the image and compare with the stored refcounts, like
    ``qemu-img check`` (no repair). ImageError if the header itself is unusable."""
    f, h = _read_header(path, lock=True)
    result = CheckResult(filename=path)
    try:
        _Checker(f, h, result).run()
    finally:
        f.close()
    return result
