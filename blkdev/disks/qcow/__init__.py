"""qcow-lite: the subset of qcow2 (QEMU docs/interop/qcow2.txt) this backend serves.

Public API: :func:`is_qcow2_header`, :class:`QcowDisk` (a ``blkdev.disks.disk.Disk``),
:func:`create_image`, :func:`image_info`, :func:`check_image` / :class:`CheckResult`.
"""

from blkdev.disks.qcow.disk import QcowDisk
from blkdev.disks.qcow.header import is_qcow2_header
from blkdev.disks.qcow.tools import CheckResult, check_image, create_image, image_info

__all__ = [
    "CheckResult",
    "QcowDisk",
    "check_image",
    "create_image",
    "image_info",
    "is_qcow2_header",
]
