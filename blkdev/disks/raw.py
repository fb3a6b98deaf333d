"""Raw images: a regular file or a block device, byte for byte.

Data moves with ``os.preadv``/``os.pwritev`` straight between the image and the guest's pages
(``buffers.lock(...).io_vecs()``), at most IOV_MAX vectors per call, looping on short
transfers. With ``cache="none"`` the image is opened O_DIRECT; requests whose guest buffers,
offset or length are not aligned to the storage's block size go through a BounceBuffer.

Flush errors are sticky: once fdatasync has failed the kernel may have dropped the dirty pages
it could not write (and cleared the error), so a later fdatasync succeeding would not mean the
earlier writes are durable. Every later flush fails too; the image must be reopened.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Callable, Sequence
from typing import Final, Literal

import structlog

from blkdev.disks.disk import SECTOR_SIZE
from blkdev.disks.hostfile import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    IOV_MAX,
    advance,
    blk_discard,
    blk_zeroout,
    block_device_size,
    check_size,
    direct_alignment,
    fallocate,
    lock_image,
    open_image_file,
    preadv_full,
    pwritev_full,
)
from blkdev.disks.probe import format_of_first_sector
from blkdev.errors import DiskIOError, ImageError, ResizeRefused
from memory import BounceBuffer, IoBuffers

log = structlog.get_logger(__name__)

_BOUNCE_CHUNK: Final = 1 << 20


class RawDisk:
    """A raw image. Use :meth:`open`."""

    format_name: Final = "raw"
    network: Final = False
    discard_granularity: Final = 4096
    """Hole punching frees whole file-system blocks (4 KiB on ext4 and xfs)."""

    def __init__(
        self,
        fd: int,
        *,
        path: str,
        size: int,
        read_only: bool,
        block_device: bool,
        direct: bool,
        align: int,
        probed: bool = False,
    ) -> None:
        self._fd = fd
        self._probed = probed
        self._path = path
        self._size = size
        self._read_only = read_only
        self._block_device = block_device
        self._direct = direct
        self._align = align
        self._closed = False
        self._close_lock = threading.Lock()
        # With O_DIRECT on storage whose block is larger than a sector, a write of part of a
        # block is a read-modify-write of the whole block; a concurrent write to the other
        # sectors of that block could be lost, so such disks serialise their writes.
        self._write_lock = threading.Lock() if direct and align > SECTOR_SIZE else None
        self._flush_error: DiskIOError | None = None
        self._nowait = True
        self._can_punch = True
        self._can_zero_range = True
        self.log = log.bind(image=path)

    @classmethod
    def open(
        cls,
        path: str,
        *,
        read_only: bool = False,
        cache: Literal["writeback", "none"] = "writeback",
        probed: bool = False,
        lock: bool = True,
    ) -> RawDisk:
        """Open and lock ``path``; ImageError (naming the fix) when it cannot be served.

        ``probed``: the format was guessed, not given, so the guest may not write a first
        sector that a later probe would take for another format (see ``blkdev.disks.registry``).
        ``lock=False`` (with ``read_only``) only looks: a migration destination learns the
        image's size while the source still holds it (``blkdev.disks.handle``)."""
        if cache not in ("writeback", "none"):
            raise ValueError(f"unknown cache mode {cache!r}")
        direct = cache == "none"
        fd = open_image_file(path, read_only=read_only, direct=direct)
        try:
            st = os.fstat(fd)
            block_device = stat.S_ISBLK(st.st_mode)
            size = block_device_size(fd) if block_device else st.st_size
            check_size(path, size)
            if lock or not read_only:
                lock_image(fd, path, read_only=read_only)
            align = direct_alignment(fd, block_device) if direct else SECTOR_SIZE
            if size % align:
                raise ImageError(
                    f"{path} is {size} bytes, not a multiple of the storage block size "
                    f"{align} that --cache none needs: use --cache writeback"
                )
            return cls(
                fd,
                path=path,
                size=size,
                read_only=read_only,
                block_device=block_device,
                direct=direct,
                align=align,
                probed=probed,
            )
        except OSError as e:
            os.close(fd)
            raise ImageError(f"cannot use {path}: {e.strerror}") from None
        except BaseException:
            os.close(fd)
            raise

    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def supports_discard(self) -> bool:
        return not self._read_only

    @property
    def supports_write_zeroes(self) -> bool:
        return not self._read_only

    @property
    def direct(self) -> bool:
        return self._direct

    @property
    def block_device(self) -> bool:
        return self._block_device

    journal_size: Final = 0
    """A completed write is in the file or the page cache: nothing to journal."""

    def attach_journal(self, region: memoryview | None) -> None:
        del region

    @property
    def rdev(self) -> int | None:
        """The block device's number (for ``blkdev.uevents``), None for a file."""
        return os.fstat(self._fd).st_rdev if self._block_device else None

    def resize(self, new_size: int, *, force: bool = False) -> None:
        """Extend (or with ``force`` truncate) an image file. A block device is resized where
        it lives (lvextend, the array) and followed through :meth:`refresh_size`."""
        if self._block_device:
            raise ResizeRefused(
                f"{self._path} is a block device: grow the device itself (lvextend, "
                "losetup -c...); the backend follows its resize event"
            )
        if self._read_only:
            raise ResizeRefused(f"{self._path} is served read-only")
        if new_size <= 0 or new_size % max(SECTOR_SIZE, self._align):
            raise ResizeRefused(
                f"{new_size} is not a positive multiple of {max(SECTOR_SIZE, self._align)} bytes"
            )
        if new_size < self._size and not force:
            raise ResizeRefused(
                f"{new_size} is smaller than the disk ({self._size} bytes): shrinking drops the "
                "guest's data past the new end; pass force to do it anyway"
            )
        with self._close_lock:
            if self._closed:
                raise ValueError("disk is closed")
            if new_size < self._size:
                # Shrink: the guest must stop using the tail first, so the size the device
                # checks against goes down before the file does.
                self._size = new_size
            try:
                os.ftruncate(self._fd, new_size)
                # The new size must survive a crash before the guest is told of it, or the
                # guest could write past an end that comes back shorter.
                os.fsync(self._fd)
            except OSError as e:
                raise DiskIOError(f"resize of {self._path} failed: {e.strerror}", e.errno) from e
            self._size = new_size
        self.log.info("image resized", size=new_size)

    def refresh_size(self) -> int:
        try:
            size = block_device_size(self._fd) if self._block_device else os.fstat(self._fd).st_size
        except OSError as e:
            raise DiskIOError(f"stat of {self._path} failed: {e.strerror}", e.errno) from e
        usable = size - size % max(SECTOR_SIZE, self._align)
        if usable != self._size:
            self.log.info("image size changed", size=usable, was=self._size)
            self._size = usable
        return self._size

    def _check(self, offset: int, length: int, write: bool) -> None:
        if self._closed:
            raise ValueError("disk is closed")
        if write and self._read_only:
            raise ValueError("write to a read-only disk")
        if offset < 0 or length < 0 or offset + length > self._size:
            raise ValueError(f"range {offset}+{length} outside the disk ({self._size} bytes)")
        if offset % SECTOR_SIZE or length % SECTOR_SIZE:
            raise ValueError(f"range {offset}+{length} is not in whole sectors")

    def _aligned(self, offset: int, buffers: IoBuffers) -> bool:
        a = self._align
        return offset % a == 0 and len(buffers) % a == 0 and buffers.is_aligned(a)

    def read(self, offset: int, buffers: IoBuffers) -> None:
        n = len(buffers)
        self._check(offset, n, write=False)
        if n == 0:
            return
        if self._direct and not self._aligned(offset, buffers):
            self._bounce_read(offset, buffers)
            return
        with buffers.lock(True) as locked:
            self._preadv_all(list(locked.io_vecs()), offset)

    @property
    def cached_io(self) -> bool:
        return not self._direct

    @property
    def aio(self) -> None:
        return None  # preadv/pwritev on I/O threads, or the C data plane

    def follow_size(self, changed: Callable[[], None]) -> Callable[[], None] | None:
        return None  # a block device's resizes come as kernel uevents (rdev)

    def fast_target(self) -> tuple[int, int, int] | None:
        if self._closed or self._write_lock is not None:
            return None  # a read-modify-write of part of a block: Python serialises those
        # A probed image guards its first sector (blkdev.disks.registry): writes there stay
        # in Python, which checks them.
        return self._fd, self._align if self._direct else 0, 1 if self._probed else 0

    def read_cached(self, offset: int, buffers: IoBuffers) -> bool:
        """Read from the page cache if every byte is there (``RWF_NOWAIT``: the kernel
        refuses rather than wait for storage); False when it is not (then nothing is
        promised about ``buffers``: call :meth:`read`)."""
        n = len(buffers)
        self._check(offset, n, write=False)
        if self._direct or not self._nowait or n == 0:
            return False
        with buffers.lock(True) as locked:
            pending = [v for v in locked.io_vecs() if len(v)]
            while pending:
                try:
                    got = os.preadv(self._fd, pending[:IOV_MAX], offset, os.RWF_NOWAIT)
                except BlockingIOError:
                    return False
                except OSError as e:
                    if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                        self._nowait = False  # this file system cannot tell: always wait
                        return False
                    raise DiskIOError(f"read of {self._path} failed: {e.strerror}", e.errno) from e
                if got == 0:
                    return False  # the file shrank: read() says so
                offset += got
                pending = advance(pending, got)
        return True

    def write_cached(self, offset: int, buffers: IoBuffers) -> bool:
        """Write into the page cache (buffered images only; False otherwise: call
        :meth:`write`). A buffered write waits for storage only when the kernel throttles
        dirty pages, which holds back every writer of the host alike."""
        if self._direct or self._probed or self._write_lock is not None:
            return False
        self.write(offset, buffers)
        return True

    def write(self, offset: int, buffers: IoBuffers) -> None:
        n = len(buffers)
        self._check(offset, n, write=True)
        if n == 0:
            return
        if self._probed and offset == 0:
            self._guarded_first_sector_write(n, buffers)
            return
        if self._direct and not self._aligned(offset, buffers):
            reader = buffers.reader()
            self._bounce_write(offset, n, lambda view: reader.readinto(view))
            return
        with buffers.lock(False) as locked:
            vecs = list(locked.io_vecs())
            if self._write_lock is None:
                self._pwritev_all(vecs, offset)
            else:
                with self._write_lock:
                    self._pwritev_all(vecs, offset)

    def _guarded_first_sector_write(self, n: int, buffers: IoBuffers) -> None:
        """A write at offset 0 of a probed image, checked in the bounce buffer, i.e. after
        the copy out of guest memory: a guest changing its buffer meanwhile cannot slip a
        header past the check."""
        reader = buffers.reader()
        checked = False

        def fill(view: memoryview) -> None:
            nonlocal checked
            reader.readinto(view)
            if not checked:
                checked = True
                kind = format_of_first_sector(bytes(view[:SECTOR_SIZE]))
                if kind != "raw":
                    raise DiskIOError(
                        f"refused a guest write that would make {self._path} probe as {kind} "
                        "(its format was only probed): serve it with --format raw to allow it",
                        errno.EPERM,
                    )

        self._bounce_write(0, n, fill)

    def flush(self) -> None:
        if self._closed:
            raise ValueError("disk is closed")
        if self._read_only:
            return
        if self._flush_error is not None:
            raise self._flush_error
        try:
            os.fdatasync(self._fd)
        except OSError as e:
            self._flush_error = DiskIOError(
                f"fdatasync of {self._path} failed ({e.strerror}); writes since the last "
                "successful flush may be lost, every later flush fails until the image is "
                "reopened",
                e.errno,
            )
            self.log.error("flush failed", errno=e.errno)
            raise self._flush_error from e

    def discard(self, offset: int, length: int) -> None:
        self._check(offset, length, write=True)
        if length == 0:
            return
        try:
            with self._write_lock or _NO_LOCK:
                if self._block_device:
                    blk_discard(self._fd, offset, length)
                elif self._can_punch:
                    fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            # Discard is advisory: storage that cannot (EOPNOTSUPP), or not at this
            # granularity (EINVAL), keeps the data, which the guest must accept.
            if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                if not self._block_device:
                    self._can_punch = False
                return
            raise DiskIOError(f"discard on {self._path} failed: {e.strerror}", e.errno) from e

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self._check(offset, length, write=True)
        if length == 0:
            return
        try:
            # Held so that zeroing part of a block cannot interleave with a read-modify-write
            # of the same block, which would bring the old bytes back.
            with self._write_lock or _NO_LOCK:
                if self._zero_in_place(offset, length, unmap):
                    return
        except OSError as e:
            raise DiskIOError(f"write zeroes on {self._path} failed: {e.strerror}", e.errno) from e
        self._bounce_write(offset, length, lambda view: None)

    def _zero_in_place(self, offset: int, length: int, unmap: bool) -> bool:
        """Zero without writing data, if the storage can; False when it cannot."""
        if self._block_device:
            try:
                blk_zeroout(self._fd, offset, length)
            except OSError as e:
                if e.errno != errno.EINVAL:  # EINVAL: not whole logical blocks
                    raise
                return False
            return True
        punch = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        if unmap and self._can_punch and self._try_fallocate(punch, offset, length):
            return True
        zero = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
        return self._can_zero_range and self._try_fallocate(zero, offset, length)

    def _try_fallocate(self, mode: int, offset: int, length: int) -> bool:
        try:
            fallocate(self._fd, mode, offset, length)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            if mode & FALLOC_FL_PUNCH_HOLE:
                self._can_punch = False
            else:
                self._can_zero_range = False
            return False
        return True

    def close(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            try:
                if not self._read_only:
                    self.flush()
            except DiskIOError:
                pass  # logged by flush; closing must still release the image
            finally:
                self._closed = True
                os.close(self._fd)

    def _preadv_all(self, vecs: Sequence[memoryview], offset: int) -> None:
        preadv_full(self._fd, vecs, offset, path=self._path, zeros_past_eof=False)

    def _pwritev_all(self, vecs: Sequence[memoryview], offset: int) -> None:
        pwritev_full(self._fd, vecs, offset, path=self._path)

    def _bounce_read(self, offset: int, buffers: IoBuffers) -> None:
        a = self._align
        writer = buffers.writer()
        end = offset + len(buffers)
        bounce = BounceBuffer(min(_BOUNCE_CHUNK, -(-(end - offset + a) // a) * a))
        view = bounce.as_mut_bytes()
        chunk = len(view)
        pos = offset
        while pos < end:
            start = pos - pos % a
            stop = min(start + chunk, -(-end // a) * a)
            self._preadv_all([view[: stop - start]], start)
            writer.write(view[pos - start : min(stop, end) - start])
            pos = min(stop, end)

    def _bounce_write(self, offset: int, length: int, fill: Callable[[memoryview], object]) -> None:
        """Write ``length`` bytes at ``offset`` through an aligned buffer; ``fill`` puts the
        data into the view it is given (a no-op leaves zeros). Partial blocks are
        read-modify-written under the write lock."""
        a = self._align
        end = offset + length
        bounce = BounceBuffer(min(_BOUNCE_CHUNK, -(-(end - offset + a) // a) * a))
        view = bounce.as_mut_bytes()
        chunk = len(view)
        pos = offset
        while pos < end:
            start = pos - pos % a
            stop = min(start + chunk, -(-end // a) * a)
            lo, hi = pos - start, min(stop, end) - start
            with self._write_lock or _NO_LOCK:
                if lo or hi < stop - start:
                    self._preadv_all([view[: stop - start]], start)
                view[lo:hi] = bytes(hi - lo)
                fill(view[lo:hi])
                self._pwritev_all([view[: stop - start]], start)
            pos = min(stop, end)


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NO_LOCK: Final = _NoLock()
