"""virtio-blk on the wire (virtio 1.2 section 5.2): layouts, and requests parsed from chains.

Everything here is pure. Turning a descriptor chain into a request goes in three steps, with
guest-memory reads in between done by the caller (``blkdev.device``):

1. :func:`split_chain` looks only at the descriptors and finds the header bytes, the data
   bytes and the status byte, whatever the driver's descriptor layout (5.2.6: the header is
   the first 16 device-readable bytes, the status the last device-writable byte; a driver may
   split or merge buffers freely, 2.7.4 "message framing").
2. :func:`decode_header` turns the 16 header bytes into a :class:`RequestHeader`.
3. :func:`plan_request` checks the request against the device's limits and yields a plan
   (:class:`Read`, :class:`Write`, :class:`Flush`, :class:`GetId`, :class:`ReadSegments`)
   or a :class:`Fail` with the status to report. DISCARD and WRITE_ZEROES carry their ranges
   in the data; :func:`decode_segments` checks those once read.

Data is described as ``(gpa, length)`` segments, merged where adjacent. Bytes a request type
has no use for (readable bytes after an IN header, writable bytes before an OUT status) are
ignored, as QEMU does.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from vhost_user.ring.chain import Descriptor

SECTOR_SHIFT: Final = 9
SECTOR_SIZE: Final = 1 << SECTOR_SHIFT

# Request types (5.2.6).
VIRTIO_BLK_T_IN: Final = 0
VIRTIO_BLK_T_OUT: Final = 1
VIRTIO_BLK_T_FLUSH: Final = 4
VIRTIO_BLK_T_GET_ID: Final = 8
VIRTIO_BLK_T_GET_LIFETIME: Final = 10
VIRTIO_BLK_T_DISCARD: Final = 11
VIRTIO_BLK_T_WRITE_ZEROES: Final = 13
VIRTIO_BLK_T_SECURE_ERASE: Final = 14

# Status values (5.2.6).
VIRTIO_BLK_S_OK: Final = 0
VIRTIO_BLK_S_IOERR: Final = 1
VIRTIO_BLK_S_UNSUPP: Final = 2

# Device feature bits (5.2.3).
VIRTIO_BLK_F_SIZE_MAX: Final = 1
VIRTIO_BLK_F_SEG_MAX: Final = 2
VIRTIO_BLK_F_GEOMETRY: Final = 4
VIRTIO_BLK_F_RO: Final = 5
VIRTIO_BLK_F_BLK_SIZE: Final = 6
VIRTIO_BLK_F_FLUSH: Final = 9
VIRTIO_BLK_F_TOPOLOGY: Final = 10
VIRTIO_BLK_F_CONFIG_WCE: Final = 11
VIRTIO_BLK_F_MQ: Final = 12
VIRTIO_BLK_F_DISCARD: Final = 13
VIRTIO_BLK_F_WRITE_ZEROES: Final = 14

VIRTIO_BLK_ID_BYTES: Final = 20
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: Final = 1 << 0

#: struct virtio_blk_req header: le32 type, le32 reserved, le64 sector.
REQUEST_HEADER: Final = struct.Struct("<IIQ")
#: struct virtio_blk_discard_write_zeroes: le64 sector, le32 num_sectors, le32 flags.
DWZ_SEGMENT: Final = struct.Struct("<QII")
#: struct virtio_blk_config up to the secure-erase fields (5.2.4), 72 bytes.
CONFIG: Final = struct.Struct(
    "<"
    "Q"  # capacity (512-byte sectors)
    "I"  # size_max
    "I"  # seg_max
    "HBB"  # geometry: cylinders, heads, sectors
    "I"  # blk_size
    "BBHI"  # topology: physical_block_exp, alignment_offset, min_io_size, opt_io_size
    "B"  # writeback
    "x"  # unused0
    "H"  # num_queues
    "I"  # max_discard_sectors
    "I"  # max_discard_seg
    "I"  # discard_sector_alignment
    "I"  # max_write_zeroes_sectors
    "I"  # max_write_zeroes_seg
    "B"  # write_zeroes_may_unmap
    "3x"  # unused1
    "I"  # max_secure_erase_sectors
    "I"  # max_secure_erase_seg
    "I"  # secure_erase_sector_alignment
)
CONFIG_WRITEBACK_OFFSET: Final = 32

_MAX_SECTOR: Final = (1 << 64) // SECTOR_SIZE

Segment = tuple[int, int]
"""``(gpa, length)`` of one piece of guest memory."""


@dataclass(frozen=True, slots=True)
class BlkConfig:
    """The device configuration space (5.2.4). Secure-erase and zoned fields stay zero."""

    capacity: int
    size_max: int = 0
    seg_max: int = 0
    cylinders: int = 0
    heads: int = 0
    sectors: int = 0
    blk_size: int = SECTOR_SIZE
    physical_block_exp: int = 0
    alignment_offset: int = 0
    min_io_size: int = 0
    opt_io_size: int = 0
    writeback: int = 0
    num_queues: int = 1
    max_discard_sectors: int = 0
    max_discard_seg: int = 0
    discard_sector_alignment: int = 0
    max_write_zeroes_sectors: int = 0
    max_write_zeroes_seg: int = 0
    write_zeroes_may_unmap: int = 0
    max_secure_erase_sectors: int = 0
    max_secure_erase_seg: int = 0
    secure_erase_sector_alignment: int = 0

    def pack(self) -> bytes:
        return CONFIG.pack(
            self.capacity,
            self.size_max,
            self.seg_max,
            self.cylinders,
            self.heads,
            self.sectors,
            self.blk_size,
            self.physical_block_exp,
            self.alignment_offset,
            self.min_io_size,
            self.opt_io_size,
            self.writeback,
            self.num_queues,
            self.max_discard_sectors,
            self.max_discard_seg,
            self.discard_sector_alignment,
            self.max_write_zeroes_sectors,
            self.max_write_zeroes_seg,
            self.write_zeroes_may_unmap,
            self.max_secure_erase_sectors,
            self.max_secure_erase_seg,
            self.secure_erase_sector_alignment,
        )

    @classmethod
    def unpack(cls, data: bytes) -> BlkConfig:
        return cls(*CONFIG.unpack(data))


@dataclass(frozen=True, slots=True)
class RequestHeader:
    type: int
    reserved: int
    sector: int

    def pack(self) -> bytes:
        return REQUEST_HEADER.pack(self.type, self.reserved, self.sector)


@dataclass(frozen=True, slots=True)
class DwzSegment:
    sector: int
    num_sectors: int
    flags: int

    def pack(self) -> bytes:
        return DWZ_SEGMENT.pack(self.sector, self.num_sectors, self.flags)


@dataclass(frozen=True, slots=True)
class ChainLayout:
    """Where a request's parts are in guest memory (step 1).

    ``status`` is the gpa of the status byte: the last byte of the chain when the last
    non-empty descriptor is device-writable, else None (nothing to report the status in).
    ``header`` covers the first ``min(16, readable bytes)`` readable bytes; ``readable`` the
    readable bytes after them; ``writable`` the writable bytes before the status byte.
    ``misordered`` is set when a readable buffer follows a writable one (2.7.4.2 forbids it).
    """

    status: int | None
    header: tuple[Segment, ...]
    header_length: int
    readable: tuple[Segment, ...]
    readable_length: int
    writable: tuple[Segment, ...]
    writable_length: int
    misordered: bool


@dataclass(frozen=True, slots=True)
class Limits:
    """What the device accepts; derived from the config space and the disk."""

    capacity_sectors: int
    read_only: bool = False
    discard: bool = False
    max_discard_sectors: int = 0
    max_discard_seg: int = 0
    write_zeroes: bool = False
    max_write_zeroes_sectors: int = 0
    max_write_zeroes_seg: int = 0


@dataclass(frozen=True, slots=True)
class Read:
    """VIRTIO_BLK_T_IN: fill ``segments`` (``length`` bytes) from disk ``offset``."""

    offset: int
    length: int
    segments: tuple[Segment, ...]


@dataclass(frozen=True, slots=True)
class Write:
    """VIRTIO_BLK_T_OUT: write ``segments`` (``length`` bytes) at disk ``offset``."""

    offset: int
    length: int
    segments: tuple[Segment, ...]


@dataclass(frozen=True, slots=True)
class Flush:
    """VIRTIO_BLK_T_FLUSH."""


@dataclass(frozen=True, slots=True)
class GetId:
    """VIRTIO_BLK_T_GET_ID: write the NUL-padded serial into ``segments`` (<= 20 bytes)."""

    length: int
    segments: tuple[Segment, ...]


@dataclass(frozen=True, slots=True)
class ReadSegments:
    """DISCARD / WRITE_ZEROES: read ``length`` bytes of ``segments`` and decode them with
    :func:`decode_segments`."""

    type: int
    length: int
    segments: tuple[Segment, ...]


@dataclass(frozen=True, slots=True)
class Fail:
    """Report ``status`` without touching the disk."""

    status: int


Plan = Read | Write | Flush | GetId | ReadSegments | Fail


@dataclass(frozen=True, slots=True)
class Range:
    """One decoded DISCARD / WRITE_ZEROES segment, in bytes."""

    offset: int
    length: int
    unmap: bool


def _append(segments: list[Segment], gpa: int, length: int) -> None:
    if length == 0:
        return
    if segments:
        last_gpa, last_length = segments[-1]
        if last_gpa + last_length == gpa:
            segments[-1] = (last_gpa, last_length + length)
            return
    segments.append((gpa, length))


def take(segments: tuple[Segment, ...], length: int) -> tuple[Segment, ...]:
    """The first ``length`` bytes of ``segments``."""
    out: list[Segment] = []
    for gpa, seg_length in segments:
        if length <= 0:
            break
        n = min(seg_length, length)
        _append(out, gpa, n)
        length -= n
    return tuple(out)


def split_chain(descriptors: tuple[Descriptor, ...] | list[Descriptor]) -> ChainLayout:
    """Find header, data and status in any descriptor layout (step 1)."""
    last_index = next(
        (i for i in range(len(descriptors) - 1, -1, -1) if descriptors[i].length > 0), -1
    )
    status: int | None = None
    if last_index >= 0 and descriptors[last_index].device_writable:
        last = descriptors[last_index]
        status = last.gpa + last.length - 1

    header: list[Segment] = []
    readable: list[Segment] = []
    writable: list[Segment] = []
    header_length = readable_length = writable_length = 0
    seen_writable = misordered = False
    for i, d in enumerate(descriptors):
        if d.length <= 0:
            continue
        if d.device_writable:
            seen_writable = True
            length = d.length - 1 if i == last_index else d.length
            _append(writable, d.gpa, length)
            writable_length += length
            continue
        misordered |= seen_writable
        in_header = min(16 - header_length, d.length)
        _append(header, d.gpa, in_header)
        header_length += in_header
        _append(readable, d.gpa + in_header, d.length - in_header)
        readable_length += d.length - in_header
    return ChainLayout(
        status=status,
        header=tuple(header),
        header_length=header_length,
        readable=tuple(readable),
        readable_length=readable_length,
        writable=tuple(writable),
        writable_length=writable_length,
        misordered=misordered,
    )


def decode_header(data: bytes) -> RequestHeader:
    """Step 2. ``data`` must be exactly 16 bytes (a caller bug otherwise)."""
    if len(data) != REQUEST_HEADER.size:
        raise ValueError(f"request header is {REQUEST_HEADER.size} bytes, got {len(data)}")
    return RequestHeader(*REQUEST_HEADER.unpack(data))


def _in_bounds(sector: int, length: int, limits: Limits) -> bool:
    # The sector is a guest-controlled le64: reject values whose byte offset would not fit in
    # 64 bits before any arithmetic, so no later layer ever sees a wrapped offset.
    if sector >= _MAX_SECTOR:
        return False
    return sector * SECTOR_SIZE + length <= limits.capacity_sectors * SECTOR_SIZE


def plan_request(header: RequestHeader, layout: ChainLayout, limits: Limits) -> Plan:
    """Step 3: what to do for a request, or which status to report.

    Requests out of range, misaligned or writing to a read-only device fail with IOERR
    (5.2.6.2: "MUST set the status byte to VIRTIO_BLK_S_IOERR for a write request if the
    VIRTIO_BLK_F_RO feature is offered"); request types the device does not offer with UNSUPP.
    """
    if layout.status is None or layout.misordered or layout.header_length < 16:
        return Fail(VIRTIO_BLK_S_IOERR)
    kind = header.type
    if kind == VIRTIO_BLK_T_IN:
        length = layout.writable_length
        if length % SECTOR_SIZE or not _in_bounds(header.sector, length, limits):
            return Fail(VIRTIO_BLK_S_IOERR)
        return Read(header.sector * SECTOR_SIZE, length, layout.writable)
    if kind == VIRTIO_BLK_T_OUT:
        if limits.read_only:
            return Fail(VIRTIO_BLK_S_IOERR)
        length = layout.readable_length
        if length % SECTOR_SIZE or not _in_bounds(header.sector, length, limits):
            return Fail(VIRTIO_BLK_S_IOERR)
        return Write(header.sector * SECTOR_SIZE, length, layout.readable)
    if kind == VIRTIO_BLK_T_FLUSH:
        return Flush()
    if kind == VIRTIO_BLK_T_GET_ID:
        length = min(layout.writable_length, VIRTIO_BLK_ID_BYTES)
        return GetId(length, take(layout.writable, length))
    if kind in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
        if kind == VIRTIO_BLK_T_DISCARD:
            supported, max_seg = limits.discard, limits.max_discard_seg
        else:
            supported, max_seg = limits.write_zeroes, limits.max_write_zeroes_seg
        if limits.read_only:
            return Fail(VIRTIO_BLK_S_IOERR)
        if not supported:
            return Fail(VIRTIO_BLK_S_UNSUPP)
        length = layout.readable_length
        if length == 0 or length % DWZ_SEGMENT.size or length // DWZ_SEGMENT.size > max_seg:
            return Fail(VIRTIO_BLK_S_UNSUPP)
        return ReadSegments(kind, length, layout.readable)
    return Fail(VIRTIO_BLK_S_UNSUPP)


def decode_segments(kind: int, data: bytes, limits: Limits) -> tuple[Range, ...] | Fail:
    """Check the ranges of a DISCARD / WRITE_ZEROES request (5.2.6.2).

    Unknown flags, and UNMAP on a DISCARD, are UNSUPP ("the device MUST set the status byte
    to VIRTIO_BLK_S_UNSUPP for discard commands if the unmap flag is set"); a range out of
    bounds or over the sector limit is IOERR.

    The sector limit bounds the whole request, not only each segment. Segments may overlap,
    so per-segment limits alone would let one 4 KiB request name 256 x 2 GiB: minutes of work
    for a worker (a qcow2 with small clusters zeroes cluster by cluster; a file system without
    FALLOC_FL_ZERO_RANGE gets real zeros written), and GET_VRING_BASE, i.e. a VM stop, waits
    for it. Linux never asks for more: its block layer caps a merged discard or write-zeroes
    request at ``max_discard_sectors`` / ``max_write_zeroes_sectors`` in total.
    """
    if kind == VIRTIO_BLK_T_DISCARD:
        max_sectors = limits.max_discard_sectors
    elif kind == VIRTIO_BLK_T_WRITE_ZEROES:
        max_sectors = limits.max_write_zeroes_sectors
    else:
        raise ValueError(f"not a DISCARD or WRITE_ZEROES request type: {kind}")
    if len(data) % DWZ_SEGMENT.size:
        raise ValueError("segment data must be a whole number of 16-byte segments")
    ranges: list[Range] = []
    total_sectors = 0
    for sector, num_sectors, flags in DWZ_SEGMENT.iter_unpack(data):
        if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:
            return Fail(VIRTIO_BLK_S_UNSUPP)
        unmap = bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)
        if kind == VIRTIO_BLK_T_DISCARD and unmap:
            return Fail(VIRTIO_BLK_S_UNSUPP)
        length = num_sectors * SECTOR_SIZE
        total_sectors += num_sectors
        if total_sectors > max_sectors or not _in_bounds(sector, length, limits):
            return Fail(VIRTIO_BLK_S_IOERR)
        if num_sectors:
            ranges.append(Range(sector * SECTOR_SIZE, length, unmap))
    return tuple(ranges)


def id_bytes(serial: str | bytes) -> bytes:
    """The GET_ID answer: the serial truncated to 20 bytes and NUL-padded (5.2.6)."""
    raw = serial.encode() if isinstance(serial, str) else serial
    return raw[:VIRTIO_BLK_ID_BYTES].ljust(VIRTIO_BLK_ID_BYTES, b"\0")
