"""Compressed clusters: where one lies, decoding it, and a cache of decoded ones.

An L2 entry with the compressed flag is a descriptor (qcow2.txt "Compressed Clusters
Descriptor"): a host byte offset, and how many 512-byte sectors after the one holding that
offset the data also uses (:func:`compressed_range`). The data is raw deflate (QEMU: zlib with
window bits -12) or zstd, as the header's compression type says.

The stored bytes run to the end of the last 512-byte sector the L2 entry names, so they may
carry padding (or the start of the next compressed cluster) after the stream; decoders stop at
the end of the stream and the output must be exactly one cluster (QEMU's qcow2_decompress and
qcow2_zstd_decompress do the same).
"""

from __future__ import annotations

import threading
import zlib
from collections import OrderedDict
from typing import Final

import zstandard

from blkdev.disks.disk import SECTOR_SIZE
from blkdev.disks.hostfile import ImageFile
from blkdev.disks.qcow.header import COMPRESSION_ZLIB, COMPRESSION_ZSTD, QcowHeader
from blkdev.errors import ImageCorruptError

_WBITS: Final = -12
_zstd_decompressor = zstandard.ZstdDecompressor()
#: Decoded clusters kept (per image).
_DECODED_CACHE: Final = 8


def compressed_range(header: QcowHeader, entry: int) -> tuple[int, int]:
    """``(offset, end)`` of the data of compressed L2 entry ``entry``: the stream starts at
    ``offset``, and ``end`` is the end of the last sector the descriptor counts. Those sectors,
    ``[offset & ~511, end)``, are what the entry references (and holds a refcount on)."""
    offset = entry & header.cluster_offset_mask
    sectors = ((entry >> header.csize_shift) & header.csize_mask) + 1
    return offset, (offset & ~(SECTOR_SIZE - 1)) + sectors * SECTOR_SIZE


def decompress_cluster(data: bytes, cluster_size: int, compression_type: int) -> bytes:
    """Decompress one cluster; ImageCorruptError if the data does not yield exactly one."""
    try:
        if compression_type == COMPRESSION_ZLIB:
            d = zlib.decompressobj(_WBITS)
            out = d.decompress(data, cluster_size)
        elif compression_type == COMPRESSION_ZSTD:
            out = _zstd_cluster(data, cluster_size)
        else:
            raise ImageCorruptError(f"unknown compression type {compression_type}")
    except (zlib.error, zstandard.ZstdError) as e:
        raise ImageCorruptError(f"compressed cluster does not decompress: {e}") from None
    if len(out) != cluster_size:
        raise ImageCorruptError(
            f"compressed cluster decompresses to {len(out)} bytes, not {cluster_size}"
        )
    return out


def _zstd_cluster(data: bytes, cluster_size: int) -> bytes:
    # A stream reader bounds the output (a hostile frame cannot inflate past one cluster);
    # QEMU may split a cluster into several frames, so read across them, and stop once the
    # cluster is full: what follows is sector padding.
    reader = _zstd_decompressor.stream_reader(data, read_across_frames=True)
    out = bytearray()
    while len(out) < cluster_size:
        chunk = reader.read(cluster_size - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def compress_cluster(data: bytes, compression_type: int) -> bytes:
    """Compress one cluster the way QEMU does (used by tests and tools)."""
    if compression_type == COMPRESSION_ZLIB:
        c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, _WBITS)
        return c.compress(data) + c.flush()
    if compression_type == COMPRESSION_ZSTD:
        return bytes(zstandard.ZstdCompressor().compress(data))
    raise ValueError(f"unknown compression type {compression_type}")


class CompressedClusters:
    """Reads and decodes the compressed clusters of one image, keeping the last few decoded
    (a guest reading a compressed cluster in pieces then decodes it once). Thread-safe: the
    cache has its own lock, and reading and decoding run outside it."""

    def __init__(self, file: ImageFile, header: QcowHeader) -> None:
        self._file = file
        self._header = header
        self._lock = threading.Lock()
        self._decoded: OrderedDict[int, bytes] = OrderedDict()

    def read(self, entry: int, file_size: int) -> bytes:
        """The cluster that compressed L2 entry ``entry`` holds, in an image file of
        ``file_size`` bytes; ImageCorruptError if it does not decode to one cluster."""
        with self._lock:
            cached = self._decoded.get(entry)
            if cached is not None:
                self._decoded.move_to_end(entry)
                return cached
        header = self._header
        offset, end = compressed_range(header, entry)
        # The stream may end short of the sectors it names (QEMU reads past the end of the
        # file as zeros); it may not start past the end.
        if offset >= file_size:
            raise ImageCorruptError(
                f"{self._file.path}: compressed cluster at {offset:#x} lies past the end of "
                "the image"
            )
        data = decompress_cluster(
            self._file.pread(offset, end - offset), header.cluster_size, header.compression_type
        )
        with self._lock:
            self._decoded[entry] = data
            while len(self._decoded) > _DECODED_CACHE:
                self._decoded.popitem(last=False)
        return data
