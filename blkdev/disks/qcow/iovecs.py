"""A list of memoryviews as one byte range: cutting it, filling it with zeros or with bytes.

A request's guest buffers arrive as such a list (``IoBuffers.lock(...).io_vecs()``). The qcow2
read and write paths cut it at cluster boundaries, because each cluster's bytes come from a
different place (the file, the backing file, a decompressed cluster, zeros). Skipping a prefix
is the host-file layer's :func:`~blkdev.disks.hostfile.advance`.
"""

from __future__ import annotations

from typing import Final

from blkdev.disks.hostfile import advance
from blkdev.disks.qcow.header import MAX_CLUSTER_BITS

ZEROS: Final = bytes(1 << MAX_CLUSTER_BITS)
"""One cluster of the largest size qcow2 allows, all zeros: the source of every zero fill."""


def slice_vecs(vecs: list[memoryview], start: int, length: int) -> list[memoryview]:
    """Bytes ``[start, start+length)`` of the concatenation of ``vecs`` (no empty views)."""
    out: list[memoryview] = []
    for view in advance(vecs, start) if start else vecs:
        if length <= 0:
            break
        if not len(view):
            continue
        if len(view) > length:
            view = view[:length]
        out.append(view)
        length -= len(view)
    return out


def copy_into(vecs: list[memoryview], data: bytes | memoryview) -> None:
    """Fill ``vecs`` with the first bytes of ``data``."""
    pos = 0
    for view in vecs:
        n = len(view)
        view[:] = data[pos : pos + n]
        pos += n


def zero_vecs(vecs: list[memoryview]) -> None:
    """Fill ``vecs`` with zeros."""
    for view in vecs:
        n = len(view)
        pos = 0
        while pos < n:
            take = min(n - pos, len(ZEROS))
            view[pos : pos + take] = ZEROS[:take]
            pos += take
