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
from blkdev.disks.qcow.bitmaps import MAX_DIRECTORY_BYTES, directory_tables
from blkdev.disks.qcow.compress import compressed_range
from blkdev.disks.qcow.header import (
    AUTOCLEAR_BITMAPS,
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
    read_header,
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
    file = ImageFile(fd, path)
    try:
        if lock:
            lock_image(fd, path, read_only=True)
        return file, read_header(file)
    except BaseException:
        file.close()
        raise


def image_info(path: str) -> dict[str, Any]:
    """``qemu-img info --output=json`` fields that apply. Does not lock (like ``-U``), so it
    works on an image being served."""
    file, header = _read_header(path, lock=False)
    try:
        st = os.fstat(file.fd)
        snapshots = _snapshot_list(file, header)
    finally:
        file.close()
    info: dict[str, Any] = {}
    if snapshots:
        info["snapshots"] = snapshots
    info |= {
        "virtual-size": header.size,
        "filename": path,
        "cluster-size": header.cluster_size,
        "format": "qcow2",
        "actual-size": st.st_blocks * 512,
    }
    if header.version == 2:
        data: dict[str, Any] = {"compat": "0.10", "compression-type": "zlib", "refcount-bits": 16}
    else:
        data = {
            "compat": "1.1",
            "compression-type": COMPRESSION_NAMES.get(
                header.compression_type, str(header.compression_type)
            ),
            "lazy-refcounts": bool(header.compatible_features & COMPAT_LAZY_REFCOUNTS),
            "refcount-bits": header.refcount_bits,
            "corrupt": bool(header.incompatible_features & INCOMPAT_CORRUPT),
            "extended-l2": bool(header.incompatible_features & INCOMPAT_EXTL2),
        }
    info["format-specific"] = {"type": "qcow2", "data": data}
    if header.backing_file is not None:
        info["backing-filename"] = header.backing_file
        info["full-backing-filename"] = (
            header.backing_file
            if os.path.isabs(header.backing_file)
            else os.path.join(os.path.dirname(path), header.backing_file)
        )
        if header.backing_format is not None:
            info["backing-filename-format"] = header.backing_format
    info["dirty-flag"] = bool(header.incompatible_features & INCOMPAT_DIRTY)
    return info


def _snapshot_list(file: ImageFile, header: QcowHeader) -> list[dict[str, Any]]:
    """The internal snapshots as ``qemu-img info`` lists them (its key order); empty when
    there are none or the table is unreadable (QEMU's limits; info stays advisory)."""
    if not header.nb_snapshots or header.nb_snapshots > _MAX_SNAPSHOTS:
        return []
    file_size = file.size()
    out: list[dict[str, Any]] = []
    pos = header.snapshots_offset
    for _ in range(header.nb_snapshots):
        if pos + _SNAPSHOT.size > file_size or pos - header.snapshots_offset > _MAX_SNAPSHOTS_BYTES:
            return []
        (_, _, id_len, name_len, date_sec, date_nsec, vm_clock, vm_state, extra_len) = (
            _SNAPSHOT.unpack(file.pread(pos, _SNAPSHOT.size))
        )
        pos += _SNAPSHOT.size
        if extra_len > _MAX_SNAPSHOT_EXTRA or pos + extra_len + id_len + name_len > file_size:
            return []
        extra = file.pread(pos, extra_len)
        pos += extra_len
        names = file.pread(pos, id_len + name_len)
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
    def __init__(self, file: ImageFile, header: QcowHeader, result: CheckResult) -> None:
        self.file = file
        self.header = header
        self.result = result
        self.cluster_size = header.cluster_size
        self.cluster_bits = header.cluster_bits
        self.file_size = file.size()
        self.nb_clusters = -(-self.file_size // self.cluster_size)
        self.references: Counter[int] = Counter()
        self.stored: dict[int, int] = {}
        self.copied_checks: list[tuple[int, bool, str]] = []

    def corruption(self, msg: str) -> None:
        self.result.corruptions += 1
        self.result.problems.append(f"ERROR {msg}")

    def inc(self, offset: int, length: int, what: str) -> bool:
        if length <= 0:
            return True
        first = offset >> self.cluster_bits
        last = (offset + length - 1) >> self.cluster_bits
        if last >= self.nb_clusters:
            self.corruption(f"{what} at {offset:#x} (+{length}) lies past the end of the file")
            return False
        for c in range(first, last + 1):
            self.references[c] += 1
        return True

    def load_refcounts(self) -> None:
        header = self.header
        raw = self.file.pread(
            header.refcount_table_offset, header.refcount_table_clusters * self.cluster_size
        )
        per_block = self.cluster_size * 8 // header.refcount_bits
        for block_index, (entry,) in enumerate(struct.iter_unpack(">Q", raw)):
            off = entry & REFT_OFFSET_MASK
            if entry & REFT_RESERVED:
                # Like QEMU: a corruption, and the block's own cluster is not counted as
                # referenced (so it also shows as a leak), but its refcounts are still read.
                self.corruption(f"refcount table entry {block_index} has reserved bits set")
                if off and not off % self.cluster_size and off < self.file_size:
                    self.load_block(block_index, off, per_block)
                continue
            if not off:
                continue
            if off % self.cluster_size:
                self.corruption(
                    f"refcount block {block_index} is not cluster aligned; refcount table entry "
                    "corrupted"
                )
                continue
            if off >= self.file_size:
                self.corruption(f"refcount block {block_index} is outside image")
                continue
            self.inc(off, self.cluster_size, f"refcount block {block_index}")
            self.load_block(block_index, off, per_block)

    def load_block(self, block_index: int, off: int, per_block: int) -> None:
        order = self.header.refcount_order
        block = self.file.pread(off, self.cluster_size)
        base = block_index * per_block
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
        return self.stored.get(offset >> self.cluster_bits, 0)

    def walk_l1(self, l1_offset: int, l1_size: int, *, active: bool) -> None:
        header = self.header
        if not self.inc(l1_offset, l1_size * 8, "L1 table"):
            return
        raw = self.file.pread(l1_offset, l1_size * 8)
        for i, (l1e,) in enumerate(struct.iter_unpack(">Q", raw)):
            if l1e & L1E_RESERVED:
                self.corruption(f"found L1 entry with reserved bits set: {l1e:x}")
            l2off = l1e & L1E_OFFSET_MASK
            if not l2off:
                if l1e and not l1e & L1E_RESERVED:
                    # qemu-img reads the header as this L2 table and counts it twice.
                    self.corruption(f"L1 entry {i} ({l1e:x}) has flags but no L2 table offset")
                continue
            if l2off % self.cluster_size:
                self.corruption(f"L2 table offset {l2off:#x} (L1 index {i}) is unaligned")
                continue
            if not self.inc(l2off, self.cluster_size, f"L2 table (L1 index {i})"):
                continue
            if active:
                self.copied_checks.append((l2off, bool(l1e & OFLAG_COPIED), f"L1 index {i}"))
            table = self.file.pread(l2off, self.cluster_size)
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
                    data_offset, data_end = compressed_range(header, e)
                    sectors_start = data_offset & ~(SECTOR_SIZE - 1)
                    if self.inc(sectors_start, data_end - sectors_start, where) and active:
                        self.result.allocated_clusters += 1
                        self.result.compressed_clusters += 1
                        # qemu-img: compressed clusters are fragmented by nature.
                        self.result.fragmented_clusters += 1
                    continue
                host = e & L2E_OFFSET_MASK
                if not host:
                    continue
                if host % self.cluster_size:
                    self.corruption(f"{where}: cluster offset {host:#x} is unaligned")
                    continue
                if not self.inc(host, self.cluster_size, where):
                    continue
                if active:
                    self.copied_checks.append((host, bool(e & OFLAG_COPIED), where))
                    self.result.allocated_clusters += 1
                    if last_host >= 0 and host != last_host + self.cluster_size:
                        self.result.fragmented_clusters += 1
                    last_host = host

    def walk_snapshots(self) -> None:
        header = self.header
        pos = header.snapshots_offset
        start = pos
        for n in range(header.nb_snapshots):
            if pos + _SNAPSHOT.size > self.file_size:
                self.corruption(f"snapshot table entry {n} lies past the end of the file")
                return
            l1_off, l1_size, id_len, name_len, _, _, _, _, extra = _SNAPSHOT.unpack(
                self.file.pread(pos, _SNAPSHOT.size)
            )
            pos += _SNAPSHOT.size + extra + id_len + name_len
            pos += -pos % 8
            if l1_off % self.cluster_size or l1_size * 8 > 32 << 20:
                self.corruption(f"snapshot {n} has an invalid L1 table")
                continue
            self.walk_l1(l1_off, l1_size, active=False)
        self.inc(start, pos - start, "snapshot table")

    def walk_bitmaps(self) -> None:
        """Persistent bitmaps own clusters too; QEMU counts them only while the autoclear
        bit says they are valid."""
        assert self.header.bitmaps is not None
        count, directory_size, directory_offset = self.header.bitmaps
        if directory_size > MAX_DIRECTORY_BYTES or not self.inc(
            directory_offset, directory_size, "bitmap directory"
        ):
            return
        directory = self.file.pread(directory_offset, directory_size)
        walked = 0
        for n, (table_offset, table_size) in enumerate(directory_tables(directory, count)):
            walked = n + 1
            if not self.inc(table_offset, table_size * 8, f"bitmap table {n}"):
                continue
            for (e,) in struct.iter_unpack(">Q", self.file.pread(table_offset, table_size * 8)):
                off = e & L2E_OFFSET_MASK
                if off:
                    self.inc(off, self.cluster_size, f"bitmap {n} data")
        if walked < count:
            self.corruption(f"bitmap directory entry {walked} runs past the directory")

    def run(self) -> None:
        header = self.header
        self.result.total_clusters = -(-header.size // self.cluster_size)
        self.inc(0, self.cluster_size, "header")
        self.walk_l1(header.l1_table_offset, header.l1_size, active=True)
        if header.nb_snapshots:
            self.walk_snapshots()
        if header.bitmaps is not None and header.autoclear_features & AUTOCLEAR_BITMAPS:
            self.walk_bitmaps()
        self.inc(
            header.refcount_table_offset,
            header.refcount_table_clusters * self.cluster_size,
            "refcount table",
        )
        self.load_refcounts()
        for off, copied, where in self.copied_checks:
            rc = self.stored_refcount(off)
            if (rc == 1) != copied:
                self.corruption(f"OFLAG_COPIED {where}: refcount={rc} copied={copied}")
        end = 0
        for c in sorted(set(self.references) | set(self.stored)):
            ref = self.references.get(c, 0)
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
                self.result.leaks += 1
                self.result.problems.append(f"Leaked cluster {c} refcount={rc} reference={ref}")
        self.result.image_end_offset = end * self.cluster_size


def check_image(path: str) -> CheckResult:
    """Walk every reference in the image and compare with the stored refcounts, like
    ``qemu-img check`` (no repair). ImageError if the header itself is unusable."""
    file, header = _read_header(path, lock=True)
    result = CheckResult(filename=path)
    try:
        _Checker(file, header, result).run()
    finally:
        file.close()
    return result
