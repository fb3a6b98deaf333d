"""The host-file layer: everything every disk does to an image file or block device.

Opening with an error that names the fix (:func:`open_image_file`), the whole-sector size rule
(:func:`check_size`), image locks (:func:`lock_image`, below), ``fallocate`` and the block-device
ioctls, the vectored I/O loops (:func:`preadv_full`, :func:`pwritev_full`) and
:class:`ImageFile`, the metadata-sized positional I/O qcow2 uses. Host failures become
``DiskIOError`` (local I/O) or ``ImageError`` (unusable as given) here, so disks above never see
a bare ``OSError``.

Positional vectored I/O: ``os.preadv``/``os.pwritev`` may move fewer bytes than asked (a
signal, a huge request) and take at most IOV_MAX vectors, so every disk goes through these loops
rather than calling them once.

Locking
-------
Two writers on one image corrupt it, so every open takes OFD locks (``F_OFD_SETLK``: owned by
the open file description, so two opens conflict even inside one process; released on the
last close). The bytes locked follow QEMU's file-posix scheme, so QEMU, qemu-img and qemu-io
see this backend as one more QEMU user of the image and the usual rules apply both ways:

- byte 100 + p (shared lock): "I hold permission p"; byte 200 + p: "I do not let others hold
  p". Permissions: 0 consistent read, 1 write, 3 resize.
- writable: hold 0 and 1, deny 1 and 3. Refuse when someone holds 1 or 3, or denies 0 or 1.
- read-only: hold 0, deny 1 and 3. Refuse when someone holds 1 or 3, or denies 0.

So two writers (ours or QEMU's) exclude each other, a writer and a reader exclude each other,
readers coexist, and ``qemu-io -U`` / ``qemu-img info -U`` (force share) can still peek as
they can at a running VM's image. Setting our locks before checking others' closes the race
between two openers: both may fail, never both succeed. Tools that do not lock (dd, cp) are not
stopped by any of this.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Sequence
from typing import Final

from blkdev.disks.disk import SECTOR_SIZE
from blkdev.errors import DiskIOError, ImageError, ImageLockedError
from memory import BounceBuffer

# Opening and size


def open_image_file(path: str, *, read_only: bool, direct: bool = False) -> int:
    """Open an image file or block device, with an ImageError naming the fix on failure."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageError(f"{path} does not exist: check the path") from None
    except OSError as e:
        raise ImageError(f"cannot access {path}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(f"{path} is a directory: give the path of an image file")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise ImageError(f"{path} is neither a regular file nor a block device")
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
    if direct:
        flags |= os.O_DIRECT
    try:
        return os.open(path, flags)
    except PermissionError:
        how = "read" if read_only else "read and write"
        hint = "" if read_only else ", or serve it with --read-only"
        raise ImageError(
            f"permission denied opening {path}: run as a user who may {how} it{hint}"
        ) from None
    except OSError as e:
        if direct and e.errno == errno.EINVAL:
            raise ImageError(
                f"{path} is on a file system without O_DIRECT: use --cache writeback"
            ) from None
        if e.errno == errno.EROFS and not read_only:
            raise ImageError(f"{path} is on a read-only file system: use --read-only") from None
        raise ImageError(f"cannot open {path}: {e.strerror}") from None


def check_size(path: str, size: int) -> None:
    """Virtio-blk counts in 512-byte sectors: refuse images that are not whole sectors."""
    if size % SECTOR_SIZE:
        fixed = (size + SECTOR_SIZE - 1) // SECTOR_SIZE * SECTOR_SIZE
        raise ImageError(
            f"{path} is {size} bytes, not a multiple of {SECTOR_SIZE}: grow it with "
            f"`truncate -s {fixed} {path}` (or `qemu-img resize -f raw {path} {fixed}`)"
        )


# Image locks (see the module docstring)

_F_OFD_GETLK: Final = getattr(fcntl, "F_OFD_GETLK", 36)
_F_OFD_SETLK: Final = getattr(fcntl, "F_OFD_SETLK", 37)
#: struct flock on Linux x86-64/aarch64: short l_type, short l_whence, off_t l_start,
#: off_t l_len, pid_t l_pid (+ padding). l_pid must be 0 for OFD locks.
_FLOCK: Final = struct.Struct("@hhqqi4x")

# QEMU's raw-posix lock bytes (block/file-posix.c): base + permission bit index.
_QEMU_PERM_BASE: Final = 100
_QEMU_SHARED_BASE: Final = 200
_PERM_CONSISTENT_READ: Final = 0
_PERM_WRITE: Final = 1
_PERM_RESIZE: Final = 3


def _flock(kind: int, start: int, length: int) -> bytes:
    return _FLOCK.pack(kind, os.SEEK_SET, start, length, 0)


def _set_lock(fd: int, kind: int, start: int, length: int) -> bool:
    try:
        fcntl.fcntl(fd, _F_OFD_SETLK, _flock(kind, start, length))
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _lock_is_free(fd: int, start: int, length: int) -> bool:
    result = fcntl.fcntl(fd, _F_OFD_GETLK, _flock(fcntl.F_WRLCK, start, length))
    return bool(_FLOCK.unpack(result)[0] == fcntl.F_UNLCK)


def _holders(fd: int) -> str:
    """Best effort: which other processes have the image open (OFD locks carry no pid)."""
    try:
        st = os.fstat(fd)
        pids = os.listdir("/proc")
    except OSError:
        return "another process"
    found: list[str] = []
    me = str(os.getpid())
    for pid in pids:
        if not pid.isdigit() or pid == me:
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for name in fds:
            try:
                other = os.stat(f"/proc/{pid}/fd/{name}")
            except OSError:
                continue
            if (other.st_dev, other.st_ino, other.st_rdev) == (st.st_dev, st.st_ino, st.st_rdev):
                try:
                    with open(f"/proc/{pid}/comm") as f:
                        comm = f.read().strip()
                except OSError:
                    comm = "?"
                found.append(f"pid {pid} ({comm})")
                break
    return ", ".join(found) if found else "another process"


def lock_image(fd: int, path: str, *, read_only: bool) -> None:
    """Take the image locks on ``fd`` (see the module docstring); raise ImageLockedError.

    The locks live as long as the open file description: closing ``fd`` releases them.
    """
    held = [_PERM_CONSISTENT_READ] if read_only else [_PERM_CONSISTENT_READ, _PERM_WRITE]
    denied = [_PERM_WRITE, _PERM_RESIZE]
    ok = all(_set_lock(fd, fcntl.F_RDLCK, _QEMU_PERM_BASE + p, 1) for p in held) and all(
        _set_lock(fd, fcntl.F_RDLCK, _QEMU_SHARED_BASE + p, 1) for p in denied
    )
    # Nobody else may hold what we deny, nor deny what we hold.
    ok = (
        ok
        and all(_lock_is_free(fd, _QEMU_PERM_BASE + p, 1) for p in denied)
        and all(_lock_is_free(fd, _QEMU_SHARED_BASE + p, 1) for p in held)
    )
    if ok:
        return
    _set_lock(fd, fcntl.F_UNLCK, 0, 0)
    if read_only:
        raise ImageLockedError(
            f"{path} is being written by {_holders(fd)}: stop that process before serving "
            "the image, even read-only"
        )
    raise ImageLockedError(
        f"{path} is in use by {_holders(fd)}: stop it before serving the image writable "
        "(two writers would corrupt it; a reader would see it change under it)"
    )


# fallocate(2) and block-device ioctls

# <linux/fs.h>
_BLKSSZGET: Final = 0x1268
_BLKDISCARD: Final = 0x1277
_BLKZEROOUT: Final = 0x127F
_BLKGETSIZE64: Final = 0x80081272
_BLK_RANGE: Final = struct.Struct("=QQ")

# <linux/falloc.h>
FALLOC_FL_KEEP_SIZE: Final = 0x01
FALLOC_FL_PUNCH_HOLE: Final = 0x02
FALLOC_FL_ZERO_RANGE: Final = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = getattr(_libc, "fallocate64", None) or _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (``os.posix_fallocate`` has none); raises OSError."""
    while _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err))


def blk_discard(fd: int, offset: int, length: int) -> None:
    """BLKDISCARD on a block device; raises OSError."""
    fcntl.ioctl(fd, _BLKDISCARD, _BLK_RANGE.pack(offset, length))


def blk_zeroout(fd: int, offset: int, length: int) -> None:
    """BLKZEROOUT on a block device (the range reads as zeros after); raises OSError."""
    fcntl.ioctl(fd, _BLKZEROOUT, _BLK_RANGE.pack(offset, length))


def block_device_size(fd: int) -> int:
    try:
        buf = fcntl.ioctl(fd, _BLKGETSIZE64, bytes(8))
        return int(struct.unpack("=Q", buf)[0])
    except OSError:
        return os.lseek(fd, 0, os.SEEK_END)


def direct_alignment(fd: int, block_device: bool) -> int:
    """The block size O_DIRECT needs: the logical sector size for a block device; for a file,
    512 if a 512-byte-aligned read works, else 4096."""
    if block_device:
        try:
            buf = fcntl.ioctl(fd, _BLKSSZGET, bytes(4))
            return max(SECTOR_SIZE, int(struct.unpack("=i", buf)[0]))
        except OSError:
            return 4096
    bounce = BounceBuffer(8192)
    try:
        os.preadv(fd, [bounce.as_mut_bytes()[SECTOR_SIZE : 2 * SECTOR_SIZE]], 0)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        return 4096
    return SECTOR_SIZE


# Vectored I/O loops

IOV_MAX: Final = 1024
"""Linux's UIO_MAXIOV: the most vectors one preadv/pwritev accepts."""


def advance(vecs: list[memoryview], n: int) -> list[memoryview]:
    """``vecs`` without its first ``n`` bytes."""
    i = 0
    while n and n >= len(vecs[i]):
        n -= len(vecs[i])
        i += 1
    rest = vecs[i:]
    if n:
        rest[0] = rest[0][n:]
    return rest


def preadv_full(
    fd: int, vecs: Sequence[memoryview], offset: int, *, path: str, zeros_past_eof: bool
) -> None:
    """Fill every byte of ``vecs`` from ``offset``. At the end of the file, either the rest
    reads as zeros (``zeros_past_eof``, qcow2's rule for clusters past the file end) or it is
    an error (a raw image that shrank under us)."""
    pending = [v for v in vecs if len(v)]
    while pending:
        try:
            n = os.preadv(fd, pending[:IOV_MAX], offset)
        except OSError as e:
            raise DiskIOError(f"read of {path} failed: {e.strerror}", e.errno) from e
        if n == 0:
            if not zeros_past_eof:
                raise DiskIOError(f"{path} ended at {offset} (was it truncated?)", errno.EIO)
            for v in pending:
                v[:] = bytes(len(v))
            return
        offset += n
        pending = advance(pending, n)


def pwritev_full(fd: int, vecs: Sequence[memoryview], offset: int, *, path: str) -> None:
    """Write every byte of ``vecs`` at ``offset``."""
    pending = [v for v in vecs if len(v)]
    while pending:
        try:
            n = os.pwritev(fd, pending[:IOV_MAX], offset)
        except OSError as e:
            raise DiskIOError(f"write to {path} failed: {e.strerror}", e.errno) from e
        if n == 0:
            raise DiskIOError(f"write to {path} made no progress", errno.EIO)
        offset += n
        pending = advance(pending, n)


class ImageFile:
    """An open image file descriptor (owned: :meth:`close` closes it)."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path

    def size(self) -> int:
        try:
            # lseek rather than fstat: it also gives the size of a block device.
            return os.lseek(self.fd, 0, os.SEEK_END)
        except OSError as e:
            raise DiskIOError(f"stat of {self.path} failed: {e.strerror}", e.errno) from e

    def pread(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``; bytes past the end of the file read as zeros (as
        QEMU's file driver returns them)."""
        buf = bytearray(length)
        self.preadv([memoryview(buf)], offset)
        return bytes(buf)

    def preadv(self, vecs: Sequence[memoryview], offset: int, length: int = -1) -> None:
        """Fill ``vecs`` (``length`` bytes, if the caller knows) from ``offset``; what lies
        past the end of the file reads as zeros."""
        if length > 0 and len(vecs) <= IOV_MAX:
            try:
                if os.preadv(self.fd, vecs, offset) == length:
                    return
            except OSError as e:
                raise DiskIOError(f"read of {self.path} failed: {e.strerror}", e.errno) from e
        preadv_full(self.fd, vecs, offset, path=self.path, zeros_past_eof=True)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.pwritev([memoryview(data)], offset)

    def pwritev(self, vecs: Sequence[memoryview], offset: int) -> None:
        pwritev_full(self.fd, vecs, offset, path=self.path)

    def sync(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            raise DiskIOError(f"fdatasync of {self.path} failed: {e.strerror}", e.errno) from e

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)
