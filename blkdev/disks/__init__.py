"""The disks: every image format behind one interface.

``disk`` (the :class:`Disk` protocol, what the virtio-blk device calls), ``hostfile`` (the
host-file layer every file-backed disk uses: open, lock, fallocate, ioctls, vectored I/O),
``probe`` (format detection), ``raw``, ``qcow/`` (qcow-lite), and ``registry`` (which module
opens an image: :func:`open_disk`).
"""

from blkdev.disks.disk import SECTOR_SIZE, Disk
from blkdev.disks.registry import FORMATS, open_disk

__all__ = ["FORMATS", "SECTOR_SIZE", "Disk", "open_disk"]
