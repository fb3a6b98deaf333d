"""Live resize: the disk, the size the guest is told, and the front-end's notice, in order.

Two ways in, one path through:

- :meth:`LiveResize.resize` (the control socket's ``resize``): we change the image ourselves;
- :meth:`LiveResize.follow` (``blkdev.uevents`` for a block device grown where it lives, e.g.
  ``lvextend`` or ``losetup -c``): the storage changed under us and we re-read its size.

Either way the device's capacity follows the disk's size and the front-end gets a
CONFIG_CHANGE_MSG on the back-end channel (vhost-user spec, "Back-end message types"). QEMU's
vhost-user-blk then reads the config space again (GET_CONFIG) and, seeing a new capacity,
raises a virtio config interrupt: the Linux guest logs "capacity change" and the disk has its
new size, with no I/O stopped.

Order is what keeps a request from reaching past the end of the image: growing, the image
grows (durably: ``Disk.resize`` syncs) before the guest may use the new sectors; shrinking, the
capacity goes down before the image does, so a request checked against the old size cannot
land in the cut tail. A resize that fails puts the capacity back to what the disk says.
If no front-end is connected, or it has no back-end channel, nothing is lost: QEMU reads the
config space again whenever it connects.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import structlog

from blkdev.device import BlkDevice
from blkdev.disks.disk import Disk

log = structlog.get_logger(__name__)


class LiveResize:
    """Resizes one served disk; thread-safe (one resize or follow at a time)."""

    def __init__(self, disk: Disk, device: BlkDevice, notify: Callable[[], bool]) -> None:
        self._disk = disk
        self._device = device
        self._notify = notify
        self._lock = threading.Lock()

    def resize(self, new_size: int, force: bool) -> None:
        """Resize the image to ``new_size`` bytes and tell the guest. Raises what
        ``Disk.resize`` raises (``ResizeRefused``: nothing changed)."""
        with self._lock:
            disk, device = self._disk, self._device
            before = device.capacity
            if new_size < disk.size and force:
                device.set_capacity(new_size)
            try:
                disk.resize(new_size, force=force)
            finally:
                device.set_capacity(disk.size)
            changed = device.capacity != before
        if changed:
            self._tell_front_end()

    def follow(self) -> None:
        """The storage may have changed size by itself: re-read it and tell the guest."""
        with self._lock:
            size = self._disk.refresh_size()
            changed = self._device.set_capacity(size)
        if changed:
            self._tell_front_end()

    def _tell_front_end(self) -> None:
        size = self._disk.size
        if self._notify():
            log.info("front-end told of the new size", size=size)
        else:
            log.info("new size not announced: no front-end took the notice", size=size)
