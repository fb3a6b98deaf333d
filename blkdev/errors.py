"""Errors of the block layer, named by whose fault they are.

- :class:`DiskIOError`: the host's storage failed (EIO, ENOSPC...). The request gets
  VIRTIO_BLK_S_IOERR; the device keeps going.
- :class:`ImageError` and subclasses: the image file is unusable as given (bad header, a
  feature outside the supported subset, a missing backing file). Raised at open with a message
  that names the problem and the fix; the CLI prints it as one line and exits 2.
- :class:`ResizeRefused`: a resize asked by the operator cannot be done as asked (a shrink
  without force, a size that is not whole sectors, a block device, a read-only image). Nothing
  changed; the control socket replies with the message.
- :class:`ImageCorruptError`: metadata turned out inconsistent while serving (for qcow2: a data
  write that would land on metadata). The request fails with IOERR and, for qcow2, the corrupt
  bit is set so the image is not trusted again until checked.
"""

from __future__ import annotations


class BlkdevError(Exception):
    """Base class of this package's errors."""


class DiskIOError(BlkdevError):
    """A host I/O operation failed; ``errno`` says how."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class ImageError(BlkdevError):
    """The image cannot be opened as asked. The message names the fix."""


class UnsupportedImageError(ImageError):
    """The image uses a feature outside what this backend supports."""


class ImageLockedError(ImageError):
    """Another process holds a conflicting lock on the image."""


class ImageCorruptError(BlkdevError):
    """Image metadata is inconsistent; the request fails and the image is flagged."""


class ResizeRefused(BlkdevError):
    """A resize cannot be done as asked; nothing changed. The message says why."""
