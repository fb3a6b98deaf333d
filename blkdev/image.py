"""Opening images: format probing, clear open errors, and image locking.

:func:`open_disk` is what the CLI calls. The returned disk has a ``format_name`` attribute
(``"raw"`` or ``"qcow2"``) saying which format was used, so the caller can log it.

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

import errno
import fcntl
import os
import stat
import struct
from typing import Final, Literal

from blkdev.disk import SECTOR_SIZE, Disk
from blkdev.errors import ImageError, ImageLockedError

QCOW2_MAGIC: Final = b"QFI\xfb"

Format = Literal["auto", "raw", "qcow2"]
Cache = Literal["writeback", "none"]

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


def is_qcow2_header(first_bytes: bytes) -> bool:
    return first_bytes[:4] == QCOW2_MAGIC


def format_of_first_sector(first: bytes) -> Literal["raw", "qcow2"]:
    """What :func:`probe_format` makes of an image that starts with ``first``."""
    try:
        from blkdev.qcow import is_qcow2_header as qcow_probe
    except ImportError:
        qcow_probe = is_qcow2_header
    return "qcow2" if qcow_probe(first) else "raw"


def probe_format(path: str) -> Literal["raw", "qcow2"]:
    """Guess the format from the first bytes: qcow2 if it has the magic, else raw."""
    fd = open_image_file(path, read_only=True)
    try:
        first = os.pread(fd, SECTOR_SIZE, 0)
    except OSError as e:
        raise ImageError(f"cannot read {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    return format_of_first_sector(first)


def open_disk(
    path: str,
    *,
    fmt: Format = "auto",
    read_only: bool = False,
    cache: Cache = "writeback",
) -> Disk:
    """Open ``path`` as a disk; ``disk.format_name`` says which format was used.

    ``fmt="auto"`` probes. A guest can write a qcow2 header into a raw image, and the next
    probe would then hand the guest the image's metadata: following its backing-file name
    would let the guest read any host file the backend can, and its virtual size would let it
    grow the host file without bound. So, as QEMU does, a probed qcow2 never opens a backing
    file (images with one need ``fmt="qcow2"``), and a probed raw image refuses a guest write
    that would make its first sector probe as anything but raw (``fmt="raw"`` allows it).
    ``cache="none"`` (O_DIRECT) applies to raw images.
    """
    if fmt not in ("auto", "raw", "qcow2"):
        raise ValueError(f"unknown image format {fmt!r}")
    if cache not in ("writeback", "none"):
        raise ValueError(f"unknown cache mode {cache!r}")
    chosen = probe_format(path) if fmt == "auto" else fmt
    if chosen == "qcow2":
        try:
            from blkdev.qcow import QcowDisk
        except ImportError:
            raise ImageError(
                f"{path} is a qcow2 image, and qcow2 support is not available in this build: "
                "convert it with `qemu-img convert -O raw`"
            ) from None
        disk: Disk = QcowDisk.open(path, read_only=read_only, allow_backing=fmt == "qcow2")
        return disk
    from blkdev.raw import RawDisk

    return RawDisk.open(path, read_only=read_only, cache=cache, probed=fmt == "auto")
