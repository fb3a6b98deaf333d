"""Backing files: opening an image's backing chain, and reading through to it.

A cluster the image does not allocate reads from its backing file (qcow2.txt "Header": the
backing file name; "Cluster mapping": an unallocated cluster without the zero flag), which is
raw or qcow2 and may itself have a backing file. Every image of the chain is opened read-only
and locked as a reader. The rules:

- The backing format is never guessed (``blkdev.disks.registry`` says why probing is not
  trusted): an image that does not name it (the backing format header extension) is refused.
- Relative names are relative to the directory of the image that names them (as QEMU does).
- A chain deeper than :data:`MAX_BACKING_DEPTH` is refused: it is most likely a loop.
- Guest bytes past the end of a (smaller) backing file read as zeros (:func:`read_backing`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Final, Protocol

from blkdev.disks.hostfile import ImageFile, lock_image, open_image_file
from blkdev.disks.qcow.header import QcowHeader
from blkdev.disks.qcow.iovecs import slice_vecs, zero_vecs
from blkdev.errors import ImageError, UnsupportedImageError

MAX_BACKING_DEPTH: Final = 32


class Backing(Protocol):
    """What an image reads through to: a :class:`RawBacking` or a read-only ``QcowDisk``."""

    @property
    def size(self) -> int: ...

    def read_vecs(self, offset: int, vecs: list[memoryview]) -> None: ...

    def close(self) -> None: ...


class RawBacking:
    """A raw backing file, read-only; bytes past its end read as zeros (the host-file layer's
    :meth:`ImageFile.preadv` rule). Its size need not be whole sectors."""

    def __init__(self, file: ImageFile, size: int) -> None:
        self._file = file
        self._size = size

    @classmethod
    def open(cls, path: str) -> RawBacking:
        fd = open_image_file(path, read_only=True)
        file = ImageFile(fd, path)
        try:
            lock_image(fd, path, read_only=True)
            return cls(file, file.size())
        except BaseException:
            file.close()
            raise

    @property
    def size(self) -> int:
        return self._size

    def read_vecs(self, offset: int, vecs: list[memoryview]) -> None:
        self._file.preadv(vecs, offset)

    def close(self) -> None:
        self._file.close()


OpenQcow2 = Callable[[str, int], Backing]
"""How :func:`open_backing` opens a qcow2 backing file: ``(path, depth)`` to a read-only
``QcowDisk`` (passed in by ``disk``, which imports this module)."""


def open_backing(header: QcowHeader, path: str, depth: int, open_qcow2: OpenQcow2) -> Backing:
    """Open the backing file that ``header`` (of the image at ``path``, ``depth`` images
    down the chain) names; ImageError naming the fix when it cannot be."""
    name = header.backing_file
    assert name is not None
    if depth + 1 >= MAX_BACKING_DEPTH:
        raise ImageError(
            f"{path}: backing chain longer than {MAX_BACKING_DEPTH} images (a loop?): "
            f"flatten it with `qemu-img convert -O qcow2 {path} NEW.qcow2`"
        )
    full = name if os.path.isabs(name) else os.path.join(os.path.dirname(path) or ".", name)
    backing_format = header.backing_format
    if backing_format is None:
        raise ImageError(
            f"{path} does not name the format of its backing file {name} (it is never "
            f"guessed): set it with `qemu-img rebase -u -b {name} -F qcow2|raw {path}`"
        )
    if backing_format not in ("raw", "qcow2"):
        raise UnsupportedImageError(
            f"{path} has a backing file in format {backing_format!r}; only raw and qcow2 are "
            f"supported: convert the backing file with `qemu-img convert -O qcow2 {full} "
            "NEW.qcow2`"
        )
    if not os.path.exists(full):
        raise ImageError(
            f"the backing file {full} of {path} does not exist: restore it or point the "
            f"image at it with `qemu-img rebase -u -b NEWPATH -F {backing_format} {path}`"
        )
    try:
        if backing_format == "raw":
            return RawBacking.open(full)
        return open_qcow2(full, depth + 1)
    except ImageError as e:
        raise type(e)(f"backing file of {path}: {e}") from None


def read_backing(backing: Backing, offset: int, length: int, vecs: list[memoryview]) -> None:
    """Guest bytes ``[offset, offset+length)`` from ``backing`` into ``vecs``; what lies past
    the backing file's end reads as zeros."""
    inside = max(0, min(length, backing.size - offset))
    if inside:
        backing.read_vecs(offset, slice_vecs(vecs, 0, inside))
    if inside < length:
        zero_vecs(slice_vecs(vecs, inside, length - inside))
