"""The disk interface every image format implements (raw, qcow-lite; later remote disks).

Validation is layered, and each layer owns its own. The virtio-blk device checks every request
against :attr:`Disk.size` first, because a request out of range is the *guest's* fault (status
IOERR). A disk checks again, because it must never write outside its image whoever calls it; an
out-of-range offset reaching a disk is then a caller bug, ``ValueError`` (local misuse).
Offsets and lengths are in bytes and multiples of :data:`SECTOR_SIZE`.

Data moves straight between the image and the guest's pages: ``read`` fills ``buffers``
(``buffers.is_write`` is True: guest memory is written), ``write`` takes from them. A disk does
that through ``buffers.lock(...).io_vecs()`` with vectored I/O (zero copy) or through a
``BounceBuffer`` when it must (O_DIRECT alignment, compression).

Methods may be called concurrently from several queue workers; an implementation serialises
what needs it (qcow-lite: one metadata lock). Failures:

- ``DiskIOError``: the host's storage failed; the request gets IOERR.
- ``ImageCorruptError``: the image's metadata is inconsistent; the request gets IOERR.
- ``memory.AccessError``: the guest's buffers were bad; the request gets IOERR. (Devices
  validate buffers before I/O, so this is rare; it must never escape as anything else.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from memory import IoBuffers

SECTOR_SIZE = 512

DiskDone = Callable[[int], None]
"""An asynchronous request's completion: called once, from any thread, with its result (>= 0:
done; a negative errno: failed, and the request gets IOERR)."""


class AsyncDisk(Protocol):
    """Requests started and completed later, for storage whose latency is a network round
    trip (``blkdev.disks.rbd``): a queue then keeps as many in flight as the guest sends.

    Each ``submit_*`` starts one request and returns; ``done`` is called when it finishes.
    ``buffers`` must stay valid until then (guest memory does: a ring stops only once every
    request it submitted has completed). A request that cannot even start raises (``DiskIOError``;
    ``ValueError`` for a caller's bad offset) and ``done`` is never called. A flush covers every
    write whose ``done`` was called before the flush was submitted."""

    def submit_read(self, offset: int, buffers: IoBuffers, done: DiskDone) -> None: ...

    def submit_write(self, offset: int, buffers: IoBuffers, done: DiskDone) -> None: ...

    def submit_flush(self, done: DiskDone) -> None: ...

    def submit_discard(self, offset: int, length: int, done: DiskDone) -> None: ...

    def submit_write_zeroes(
        self, offset: int, length: int, unmap: bool, done: DiskDone
    ) -> None: ...


class Disk(Protocol):
    @property
    def format_name(self) -> str:
        """The format served (``"raw"``, ``"qcow2"``): a row of ``blkdev.disks.registry``."""
        ...

    @property
    def discard_granularity(self) -> int:
        """Bytes a discard should cover to free anything (a power of two >= SECTOR_SIZE): the
        guest learns it as ``discard_sector_alignment``."""
        ...

    @property
    def size(self) -> int:
        """Virtual size in bytes (a multiple of SECTOR_SIZE)."""
        ...

    @property
    def read_only(self) -> bool: ...

    @property
    def network(self) -> bool:
        """Whether the disk reaches its storage over TCP connections of this process (RBD:
        librados's, to the monitors and OSDs): ``query-stats`` and the metrics then show
        their TCP statistics (``blkdev.netstats``)."""
        ...

    @property
    def supports_discard(self) -> bool: ...

    @property
    def supports_write_zeroes(self) -> bool: ...

    def read(self, offset: int, buffers: IoBuffers) -> None:
        """Read ``len(buffers)`` bytes at ``offset`` into guest memory."""
        ...

    def write(self, offset: int, buffers: IoBuffers) -> None:
        """Write ``len(buffers)`` bytes from guest memory at ``offset``."""
        ...

    @property
    def aio(self) -> AsyncDisk | None:
        """The disk's asynchronous interface, when it has one (then the device submits every
        read, write, flush, discard and write-zeroes through it); None: the device calls the
        synchronous methods, from I/O threads where they may wait."""
        ...

    def fast_target(self) -> tuple[int, int, int] | None:
        """For the C data plane (``blkdev.fastpath``): (fd, O_DIRECT alignment or 0, sectors
        below which writes must take the Python path) when plain reads and writes are
        ``preadv``/``pwritev`` of the fd at the guest's offset (a raw image); else None."""
        ...

    @property
    def cached_io(self) -> bool:
        """Whether :meth:`read_cached` and :meth:`write_cached` can ever succeed (a buffered
        raw image: yes; O_DIRECT or qcow2: no, so the device does not try)."""
        ...

    def read_cached(self, offset: int, buffers: IoBuffers) -> bool:
        """:meth:`read`, if it can be done without waiting for storage (a page-cache hit):
        the device then serves it on the queue's own thread, saving a hand-off to an I/O
        thread. False when it cannot (nothing is promised about ``buffers``; the device
        calls :meth:`read` from an I/O thread)."""
        ...

    def write_cached(self, offset: int, buffers: IoBuffers) -> bool:
        """:meth:`write`, likewise, if it needs no wait for storage; False otherwise."""
        ...

    def flush(self) -> None:
        """Make every completed write durable (fdatasync, qcow2 metadata included)."""
        ...

    def discard(self, offset: int, length: int) -> None:
        """The guest no longer needs these bytes; reads may return zeros or old data after."""
        ...

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """The range reads as zeros afterwards; ``unmap`` allows deallocating it."""
        ...

    @property
    def rdev(self) -> int | None:
        """The host block device the disk is, as ``st_rdev`` (for following its kernel
        resize events, ``blkdev.uevents``); None when it is not one."""
        ...

    def resize(self, new_size: int, *, force: bool = False) -> None:
        """Grow (or, with ``force``, shrink) the image to ``new_size`` bytes, crash-safely.
        ``ResizeRefused`` when it cannot be done as asked (nothing changed then)."""
        ...

    def refresh_size(self) -> int:
        """Re-read the size of storage that can grow by itself (a block device after a kernel
        resize uevent) and return it; a disk whose size only it changes returns ``size``."""
        ...

    def follow_size(self, changed: Callable[[], None]) -> Callable[[], None] | None:
        """Call ``changed`` whenever storage that can change size by itself, by means the
        disk itself can watch (an RBD image resized by another client), may have; returns a
        function that stops following, or None when the disk cannot tell (a block device's
        resizes come from kernel uevents instead, ``blkdev.uevents`` with :attr:`rdev`)."""
        ...

    @property
    def journal_size(self) -> int:
        """Bytes of memory that outlives the process (the inflight area) the disk wants for a
        journal of what a guest saw complete but the image file does not hold yet (qcow2's
        unflushed metadata); 0 when a completed request is in the file (or the host's page
        cache) already, as for raw images."""
        ...

    def attach_journal(self, region: memoryview | None) -> None:
        """Keep that journal in ``region`` (``journal_size`` bytes or more), replaying first
        what a backend that died left in it; None detaches it, before the memory goes away.
        Errors are logged: a journal that cannot be replayed loses its changes."""
        ...

    def close(self) -> None:
        """Flush and release the image (and its lock). Idempotent."""
        ...
