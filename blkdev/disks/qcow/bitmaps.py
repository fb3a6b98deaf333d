"""Persistent dirty bitmaps (qcow2.txt "Bitmaps extension", "Bitmap directory"): walking their
directory, and dropping them when an image is opened writable.

We do not maintain bitmaps, and our writes would make them stale. qcow2.txt: a writer that
does not know an autoclear feature clears its bit, and a bitmaps extension whose autoclear bit
(0) is clear is ignored, its clusters leaked. So a writable open (:func:`drop_bitmaps`) clears
the autoclear bits, then drops the extension, then frees the clusters, in that order, each step
durable before the next: a crash in between leaves bitmaps that are ignored, or leaked
clusters, never a bitmap that claims to be valid.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import replace
from typing import Final

from blkdev.disks.hostfile import ImageFile
from blkdev.disks.qcow.alloc import Refcounts
from blkdev.disks.qcow.header import (
    AUTOCLEAR_BITMAPS,
    BITMAP_DIR_ENTRY,
    EXT_BITMAPS,
    L2E_OFFSET_MASK,
    OFF_AUTOCLEAR_FEATURES,
    U64,
    QcowHeader,
    extensions_without,
)

MAX_DIRECTORY_BYTES: Final = 64 << 20
"""Bitmap directories above this are not walked (nor, when dropping, bitmap tables): their
clusters then leak."""


def directory_tables(directory: bytes, count: int) -> Iterator[tuple[int, int]]:
    """``(table_offset, table_size)`` of each of the ``count`` entries of a bitmap directory
    (``table_size`` in 8-byte entries); stops early at an entry that runs past its end."""
    pos = 0
    for _ in range(count):
        if pos + BITMAP_DIR_ENTRY.size > len(directory):
            return
        table_offset, table_size, _, _, _, name_size, extra_size = BITMAP_DIR_ENTRY.unpack_from(
            directory, pos
        )
        pos += BITMAP_DIR_ENTRY.size + extra_size + name_size
        pos += -pos % 8
        yield table_offset, table_size


def drop_bitmaps(
    file: ImageFile, header: QcowHeader, refcounts: Refcounts, file_size: int
) -> tuple[QcowHeader, list[int]]:
    """Clear the autoclear bits and drop the bitmaps extension of a writable image (see the
    module docstring); returns the header as it now is and the clusters the bitmaps owned,
    which the caller frees (``writeback``: decremented at the next writeback, like every
    other dropped reference)."""
    if not header.autoclear_features and header.bitmaps is None:
        return header, []
    owned = (
        _owned_clusters(file, header, refcounts, file_size)
        if header.autoclear_features & AUTOCLEAR_BITMAPS
        else []
    )
    file.pwrite(OFF_AUTOCLEAR_FEATURES, U64.pack(0))
    file.sync()
    types = header.extension_types
    if EXT_BITMAPS in types:
        first = file.pread(0, min(file_size, header.cluster_size))
        file.pwrite(header.header_length, extensions_without(first, header, EXT_BITMAPS))
        file.sync()
        types = tuple(t for t in types if t != EXT_BITMAPS)
    return replace(header, autoclear_features=0, bitmaps=None, extension_types=types), owned


def _owned_clusters(
    file: ImageFile, header: QcowHeader, refcounts: Refcounts, file_size: int
) -> list[int]:
    """The clusters the bitmap directory, tables and data occupy; empty (they leak)
    unless every one is a counted, non-metadata cluster of the file named once."""
    if header.bitmaps is None:
        return []
    count, directory_size, directory_offset = header.bitmaps
    cluster_size = header.cluster_size
    bits = header.cluster_bits
    out: list[int] = []

    def add(offset: int, length: int) -> bool:
        if not length or offset % cluster_size or offset + length > file_size:
            return False
        out.extend(range(offset >> bits, ((offset + length - 1) >> bits) + 1))
        # Each cluster may be named once, so a longer list is already invalid.
        return len(out) <= file_size >> bits

    if directory_size > MAX_DIRECTORY_BYTES or not add(directory_offset, directory_size):
        return []
    directory = file.pread(directory_offset, directory_size)
    walked = 0
    for table_offset, table_size in directory_tables(directory, count):
        walked += 1
        if table_size * 8 > MAX_DIRECTORY_BYTES or not add(table_offset, table_size * 8):
            return []
        table = file.pread(table_offset, table_size * 8)
        for (entry,) in struct.iter_unpack(">Q", table):
            if entry & L2E_OFFSET_MASK and not add(entry & L2E_OFFSET_MASK, cluster_size):
                return []
    if walked < count:
        return []
    if len(set(out)) != len(out) or any(c in refcounts.meta or not refcounts.get(c) for c in out):
        return []
    return out
