"""Compressed clusters: raw deflate (QEMU: zlib with window bits -12) or zstd.

The stored bytes run to the end of the last 512-byte sector the L2 entry names, so they may
carry padding (or the start of the next compressed cluster) after the stream; decoders stop at
the end of the stream and the output must be exactly one cluster (QEMU's qcow2_decompress and
qcow2_zstd_decompress do the same).
"""

from __future__ import annotations

import zlib
from typing import Final

import zstandard

from blkdev.disks.qcow.header import COMPRESSION_ZLIB, COMPRESSION_ZSTD
from blkdev.errors import ImageCorruptError

_WBITS: Final = -12
_zstd_decompressor = zstandard.ZstdDecompressor()


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
