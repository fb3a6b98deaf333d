"""Which format an image is, from its first sector.

A probe only looks for the qcow2 magic: anything else is raw. ``blkdev.disks.registry`` uses it
when the user asked for ``--format auto``; a probed raw disk uses :func:`format_of_first_sector`
to refuse a guest write that would turn its image into something else (see ``open_disk``).
"""

from __future__ import annotations

import os
from typing import Literal

from blkdev.disks.disk import SECTOR_SIZE
from blkdev.disks.hostfile import open_image_file
from blkdev.disks.qcow.header import is_qcow2_header
from blkdev.errors import ImageError

ProbedFormat = Literal["raw", "qcow2"]


def format_of_first_sector(first: bytes) -> ProbedFormat:
    """What :func:`probe_format` makes of an image that starts with ``first``."""
    return "qcow2" if is_qcow2_header(first) else "raw"


def probe_format(path: str) -> ProbedFormat:
    """Guess the format from the first bytes: qcow2 if it has the magic, else raw."""
    fd = open_image_file(path, read_only=True)
    try:
        first = os.pread(fd, SECTOR_SIZE, 0)
    except OSError as e:
        raise ImageError(f"cannot read {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    return format_of_first_sector(first)
