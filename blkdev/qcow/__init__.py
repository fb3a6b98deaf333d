"""qcow-lite: the subset of qcow2 (QEMU docs/interop/qcow2.txt) this backend serves.

Public API: :func:`is_qcow2_header`, :class:`QcowDisk` (a ``blkdev.disk.Disk``),
:func:`create_image`, :func:`image_info`, :func:`check_image` / :class:`CheckResult`.
"""

from blkdev.qcow.disk import QcowDisk
from blkdev.qcow.header import is_qcow2_header
from blkdev.qcow.tools import CheckResult, check_image, create_image, image_info

__all__ = [
    "CheckResult",
    "QcowDisk",
    "check_image",
    "create_image",
    "image_info",
    "is_qcow2_header",
]
