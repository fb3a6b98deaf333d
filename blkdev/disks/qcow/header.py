"""qcow2 on-disk layouts (QEMU docs/interop/qcow2.txt), header parsing and the subset rules.

Parsing is pure: :func:`parse_header` takes the image's first cluster (or less) and the file
size and returns a :class:`QcowHeader` or raises :class:`ImageError` (:func:`read_header` reads
those from an open image). Every offset and size the header names is checked against the file
before anyone uses it. :func:`check_supported` then applies the qcow-lite subset, naming the
feature and the qemu-img command that removes it.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import Final

from blkdev.disks.disk import SECTOR_SIZE
from blkdev.disks.hostfile import ImageFile
from blkdev.errors import ImageError, UnsupportedImageError

MAGIC: Final = b"QFI\xfb"

#: Fields common to versions 2 and 3 (bytes 0..71).
HEADER_V2: Final = struct.Struct(">4sIQIIQIIQQIIQ")
#: Version 3 additions (bytes 72..103).
HEADER_V3_EXTRA: Final = struct.Struct(">QQQII")
HEADER_V2_SIZE: Final = 72
HEADER_V3_MIN_SIZE: Final = 104
#: Our own v3 header: 104 bytes + compression type byte + padding to a multiple of 8.
HEADER_V3_OWN_SIZE: Final = 112
EXTENSION: Final = struct.Struct(">II")
U64: Final = struct.Struct(">Q")
BITMAPS_EXT: Final = struct.Struct(">IIQQ")
#: Bitmap directory entry (qcow2.txt "Bitmap directory"), before extra data and name.
BITMAP_DIR_ENTRY: Final = struct.Struct(">QIIBBHI")
U32: Final = struct.Struct(">I")

# Byte offsets of header fields we update in place.
OFF_SIZE: Final = 24
OFF_REFCOUNT_TABLE_OFFSET: Final = 48
OFF_REFCOUNT_TABLE_CLUSTERS: Final = 56
OFF_INCOMPATIBLE_FEATURES: Final = 72
OFF_AUTOCLEAR_FEATURES: Final = 88

MIN_CLUSTER_BITS: Final = 9
MAX_CLUSTER_BITS: Final = 21
# QEMU's own limits (block/qcow2.h QCOW_MAX_L1_SIZE, QCOW_MAX_REFTABLE_SIZE): larger tables are
# refused there too, and bounding them keeps a hostile header from making us allocate GiBs.
MAX_L1_BYTES: Final = 32 << 20
MAX_REFTABLE_BYTES: Final = 8 << 20
MAX_BACKING_NAME: Final = 1023

INCOMPAT_DIRTY: Final = 1 << 0
INCOMPAT_CORRUPT: Final = 1 << 1
INCOMPAT_DATA_FILE: Final = 1 << 2
INCOMPAT_COMPRESSION: Final = 1 << 3
INCOMPAT_EXTL2: Final = 1 << 4
INCOMPAT_KNOWN: Final = 0x1F

COMPAT_LAZY_REFCOUNTS: Final = 1 << 0
AUTOCLEAR_BITMAPS: Final = 1 << 0

EXT_END: Final = 0x00000000
EXT_BACKING_FORMAT: Final = 0xE2792ACA
EXT_FEATURE_TABLE: Final = 0x6803F857
EXT_BITMAPS: Final = 0x23852875
EXT_CRYPTO: Final = 0x0537BE77
EXT_DATA_FILE: Final = 0x44415441

COMPRESSION_ZLIB: Final = 0
COMPRESSION_ZSTD: Final = 1
COMPRESSION_NAMES: Final = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

# Table entries (qcow2.txt "Cluster mapping").
OFLAG_COPIED: Final = 1 << 63
OFLAG_COMPRESSED: Final = 1 << 62
OFLAG_ZERO: Final = 1
L1E_OFFSET_MASK: Final = 0x00FF_FFFF_FFFF_FE00
L2E_OFFSET_MASK: Final = 0x00FF_FFFF_FFFF_FE00
REFT_OFFSET_MASK: Final = 0xFFFF_FFFF_FFFF_FE00
L1E_RESERVED: Final = 0x7F00_0000_0000_01FF
L2E_STD_RESERVED: Final = 0x3F00_0000_0000_01FE
REFT_RESERVED: Final = 0x1FF


def is_qcow2_header(first_bytes: bytes) -> bool:
    """True when ``first_bytes`` start with the qcow2 magic. Any version counts: an image of
    a version we cannot read must be refused as qcow2, never served as raw."""
    return first_bytes[:4] == MAGIC


@dataclass(frozen=True)
class QcowHeader:
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = HEADER_V2_SIZE
    compression_type: int = COMPRESSION_ZLIB
    backing_file: str | None = None
    backing_format: str | None = None
    extension_types: tuple[int, ...] = field(default=())
    #: Bitmaps extension: (nb_bitmaps, directory size, directory offset).
    bitmaps: tuple[int, int, int] | None = None

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // 8

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def refcount_block_entries(self) -> int:
        return self.cluster_size * 8 // self.refcount_bits

    @property
    def csize_shift(self) -> int:
        return 62 - (self.cluster_bits - 8)

    @property
    def csize_mask(self) -> int:
        return (1 << (self.cluster_bits - 8)) - 1

    @property
    def cluster_offset_mask(self) -> int:
        return (1 << self.csize_shift) - 1


def _fail(path: str, why: str) -> ImageError:
    return ImageError(f"{path} is not a valid qcow2 image: {why}")


def l1_entries_needed(size: int, cluster_bits: int) -> int:
    per_l2 = 1 << (cluster_bits + cluster_bits - 3)
    return -(-size // per_l2)


def parse_header(data: bytes, file_size: int, path: str = "image") -> QcowHeader:
    """Parse and bounds-check a qcow2 header; ``data`` is the start of the file (at least the
    first cluster when the file has one). Raises ImageError (UnsupportedImageError for valid
    images outside what we can read at all)."""
    if len(data) < HEADER_V2_SIZE or data[:4] != MAGIC:
        raise _fail(path, "no qcow2 header")
    (
        _magic,
        version,
        backing_file_offset,
        backing_file_size,
        cluster_bits,
        size,
        crypt_method,
        l1_size,
        l1_table_offset,
        refcount_table_offset,
        refcount_table_clusters,
        nb_snapshots,
        snapshots_offset,
    ) = HEADER_V2.unpack_from(data)
    if version not in (2, 3):
        raise UnsupportedImageError(
            f"{path} is qcow2 version {version}; only versions 2 and 3 are supported: "
            "convert it with `qemu-img convert -O qcow2 -o compat=1.1`"
        )
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise _fail(path, f"cluster_bits {cluster_bits} is outside 9..21")
    cluster_size = 1 << cluster_bits
    incompat = compat = autoclear = 0
    refcount_order = 4
    header_length = HEADER_V2_SIZE
    compression_type = COMPRESSION_ZLIB
    if version == 3:
        if len(data) < HEADER_V3_MIN_SIZE:
            raise _fail(path, "version 3 header is truncated")
        incompat, compat, autoclear, refcount_order, header_length = HEADER_V3_EXTRA.unpack_from(
            data, HEADER_V2_SIZE
        )
        if header_length < HEADER_V3_MIN_SIZE or header_length % 8:
            raise _fail(path, f"header_length {header_length} is invalid")
        if header_length > cluster_size or header_length > len(data):
            raise _fail(path, f"header_length {header_length} exceeds the first cluster")
        if refcount_order > 6:
            raise _fail(path, f"refcount_order {refcount_order} is above 6")
        if header_length > HEADER_V3_MIN_SIZE:
            compression_type = data[HEADER_V3_MIN_SIZE]
        if compression_type != COMPRESSION_ZLIB and not incompat & INCOMPAT_COMPRESSION:
            raise _fail(path, "compression type set without its incompatible feature bit")
        if incompat & INCOMPAT_COMPRESSION and header_length <= HEADER_V3_MIN_SIZE:
            raise _fail(path, "compression type bit set but the header has no such field")
    if size % SECTOR_SIZE:
        fixed = -(-size // SECTOR_SIZE) * SECTOR_SIZE
        raise ImageError(
            f"{path} has a virtual size of {size} bytes, not a multiple of {SECTOR_SIZE}: "
            f"resize it with `qemu-img resize {path} {fixed}`"
        )
    if size >= 1 << 62:
        raise _fail(path, f"virtual size {size} is too large")
    if l1_size * 8 > MAX_L1_BYTES:
        raise _fail(path, f"L1 table of {l1_size} entries is too large")
    if l1_size < l1_entries_needed(size, cluster_bits):
        raise _fail(path, f"L1 table of {l1_size} entries does not cover the virtual size")
    _check_table(path, "L1 table", l1_table_offset, l1_size * 8, cluster_size, file_size)
    if refcount_table_clusters * cluster_size > MAX_REFTABLE_BYTES:
        raise _fail(path, f"refcount table of {refcount_table_clusters} clusters is too large")
    _check_table(
        path,
        "refcount table",
        refcount_table_offset,
        refcount_table_clusters * cluster_size,
        cluster_size,
        file_size,
    )
    if nb_snapshots:
        if snapshots_offset % cluster_size or snapshots_offset >= file_size:
            raise _fail(path, f"snapshot table offset {snapshots_offset:#x} is invalid")

    ext_start = header_length
    ext_end = backing_file_offset if backing_file_offset else cluster_size
    ext_end = min(ext_end, cluster_size, len(data))
    backing_format: str | None = None
    bitmaps: tuple[int, int, int] | None = None
    types: list[int] = []
    pos = ext_start
    while pos + EXTENSION.size <= ext_end:
        ext_type, ext_len = EXTENSION.unpack_from(data, pos)
        pos += EXTENSION.size
        if ext_type == EXT_END:
            break
        if ext_len > ext_end - pos:
            raise _fail(path, f"header extension {ext_type:#x} runs past its area")
        types.append(ext_type)
        if ext_type == EXT_BACKING_FORMAT:
            backing_format = _decode(data[pos : pos + ext_len])
        elif ext_type == EXT_BITMAPS and ext_len >= BITMAPS_EXT.size:
            nb, _, dir_size, dir_offset = BITMAPS_EXT.unpack_from(data, pos)
            bitmaps = (nb, dir_size, dir_offset)
        pos += (ext_len + 7) & ~7

    backing_file: str | None = None
    if backing_file_offset:
        if backing_file_size > MAX_BACKING_NAME or backing_file_size == 0:
            raise _fail(path, f"backing file name length {backing_file_size} is invalid")
        if backing_file_offset + backing_file_size > min(cluster_size, len(data)):
            raise _fail(path, "backing file name lies outside the first cluster")
        backing_file = _decode(data[backing_file_offset : backing_file_offset + backing_file_size])
    return QcowHeader(
        version=version,
        backing_file_offset=backing_file_offset,
        backing_file_size=backing_file_size,
        cluster_bits=cluster_bits,
        size=size,
        crypt_method=crypt_method,
        l1_size=l1_size,
        l1_table_offset=l1_table_offset,
        refcount_table_offset=refcount_table_offset,
        refcount_table_clusters=refcount_table_clusters,
        nb_snapshots=nb_snapshots,
        snapshots_offset=snapshots_offset,
        incompatible_features=incompat,
        compatible_features=compat,
        autoclear_features=autoclear,
        refcount_order=refcount_order,
        header_length=header_length,
        compression_type=compression_type,
        backing_file=backing_file,
        backing_format=backing_format,
        extension_types=tuple(types),
        bitmaps=bitmaps,
    )


def read_header(file: ImageFile) -> QcowHeader:
    """Parse the header of the open image ``file`` (see :func:`parse_header`)."""
    file_size = file.size()
    return parse_header(file.pread(0, min(file_size, 1 << MAX_CLUSTER_BITS)), file_size, file.path)


def extensions_without(data: bytes, h: QcowHeader, ext_type: int) -> bytes:
    """The header extension area of ``data`` (the image's first cluster, as parsed into
    ``h``) with every extension of ``ext_type`` removed, zero padded to the length of the
    area it replaces; it is written back at ``h.header_length``."""
    end = h.backing_file_offset if h.backing_file_offset else h.cluster_size
    end = min(end, h.cluster_size, len(data))
    kept: list[bytes] = []
    pos = h.header_length
    while pos + EXTENSION.size <= end:
        ext_type_here, ext_len = EXTENSION.unpack_from(data, pos)
        start = pos
        pos += EXTENSION.size
        if ext_type_here == EXT_END:
            break
        pos = min(end, pos + ((ext_len + 7) & ~7))
        if ext_type_here != ext_type:
            kept.append(data[start:pos])
    new = b"".join(kept) + EXTENSION.pack(EXT_END, 0)
    old_len = pos - h.header_length
    return new + bytes(max(0, old_len - len(new)))


def _decode(raw: bytes) -> str:
    return os.fsdecode(raw.split(b"\0", 1)[0])


def _check_table(
    path: str, what: str, offset: int, length: int, cluster_size: int, file_size: int
) -> None:
    if length == 0:
        return
    if offset % cluster_size:
        raise _fail(path, f"{what} offset {offset:#x} is not cluster aligned")
    if offset == 0:
        raise _fail(path, f"{what} overlaps the header")
    if offset + length > file_size:
        raise _fail(path, f"{what} at {offset:#x} (+{length}) lies past the end of the file")


def check_supported(h: QcowHeader, path: str, *, writable: bool) -> None:
    """Refuse images outside qcow-lite, naming the feature and a remedy."""
    convert = f"`qemu-img convert -O qcow2 {path} NEW.qcow2`"
    unknown = h.incompatible_features & ~INCOMPAT_KNOWN
    if unknown:
        raise UnsupportedImageError(
            f"{path} uses unknown incompatible qcow2 features (bits {unknown:#x}): "
            f"convert it with {convert} using the qemu-img that made it"
        )
    if h.crypt_method or EXT_CRYPTO in h.extension_types:
        raise UnsupportedImageError(
            f"{path} is encrypted, which is not supported: decrypt it with "
            f"`qemu-img convert --object secret,... --image-opts ... -O qcow2 NEW.qcow2`"
        )
    if h.incompatible_features & INCOMPAT_DATA_FILE or EXT_DATA_FILE in h.extension_types:
        raise UnsupportedImageError(
            f"{path} keeps its data in an external data file, which is not supported: "
            f"make a self-contained image with {convert}"
        )
    if h.incompatible_features & INCOMPAT_EXTL2:
        raise UnsupportedImageError(
            f"{path} uses extended L2 entries (subclusters), which are not supported: "
            f"convert it with `qemu-img convert -O qcow2 -o extended_l2=off {path} NEW.qcow2`"
        )
    if h.compression_type not in COMPRESSION_NAMES:
        raise UnsupportedImageError(
            f"{path} uses unknown compression type {h.compression_type}: convert it with "
            f"`qemu-img convert -O qcow2 -o compression_type=zlib {path} NEW.qcow2`"
        )
    if not writable:
        return
    if h.version == 2:
        raise UnsupportedImageError(
            f"{path} is qcow2 version 2 (compat=0.10), which is served read-only only: "
            f"upgrade it with `qemu-img amend -o compat=1.1 {path}` or use --read-only"
        )
    if h.incompatible_features & INCOMPAT_CORRUPT:
        raise UnsupportedImageError(
            f"{path} is marked corrupt: repair it with `qemu-img check -r all {path}` "
            "(or serve it with --read-only)"
        )
    if h.incompatible_features & INCOMPAT_DIRTY:
        raise UnsupportedImageError(
            f"{path} is marked dirty (lazy refcounts not written back): repair it with "
            f"`qemu-img check -r all {path}` (or serve it with --read-only)"
        )
    if h.nb_snapshots:
        raise UnsupportedImageError(
            f"{path} has {h.nb_snapshots} internal snapshot(s), which are served read-only "
            f"only: delete them with `qemu-img snapshot -d NAME {path}`, copy out the active "
            f"layer with {convert}, or use --read-only"
        )
    if h.refcount_order != 4:
        raise UnsupportedImageError(
            f"{path} has {h.refcount_bits}-bit refcounts; writing needs 16-bit: change it "
            f"with `qemu-img amend -o refcount_bits=16 {path}` or use --read-only"
        )
