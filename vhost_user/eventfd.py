"""The front-end's eventfds (kick, call, err), used so that the front-end cannot block us.

An eventfd is shared with the front-end: we hold our own fd, but the *open file description*
behind it, and so its O_NONBLOCK flag and its counter, is the front-end's too. A hostile
front-end can fill the counter (then a write blocks), drain it under us (then a read blocks),
clear O_NONBLOCK again after we set it, or create the fd with EFD_SEMAPHORE (then a read takes
1 off the counter, the fd stays readable, and a worker polling it would spin). So:

- :func:`check` refuses what is not a plain eventfd, semaphores included, and sets O_NONBLOCK
  (which QEMU's eventfds have anyway) as a first line.
- :func:`drain` reads with ``RWF_NOWAIT``: EAGAIN on an empty counter whatever the file's
  flags say (eventfd honours IOCB_NOWAIT on reads).
- :func:`signal` writes only after ``poll`` said the counter has room. A front-end that fills
  it in between can still block that write; the owner of the writing thread then unblocks it
  by draining the counter itself (:func:`drain`), see ``QueueWorker.stop``.
"""

from __future__ import annotations

import errno
import os
import select

from vhost_user.errors import FrontendProtocolError

_COUNTER = 8


def _is_semaphore(fd: int) -> bool:
    try:
        with open(f"/proc/self/fdinfo/{fd}", encoding="ascii", errors="replace") as info:
            return any(line.split() == ["eventfd-semaphore:", "1"] for line in info)
    except OSError:
        return False


def check(fd: int, what: str) -> int:
    """``fd`` if it is a plain eventfd (made non-blocking), else FrontendProtocolError."""
    try:
        kind = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        kind = ""
    if kind != "anon_inode:[eventfd]":
        raise FrontendProtocolError(f"{what}: fd is not an eventfd")
    if _is_semaphore(fd):
        raise FrontendProtocolError(f"{what}: an EFD_SEMAPHORE eventfd cannot be a notifier")
    os.set_blocking(fd, False)
    return fd


def readable(fd: int) -> bool:
    """Whether a read of ``fd`` would find something now (poll, no wait)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def drain(fd: int) -> int | None:
    """Reset the counter; its value, or None if it was 0. Never blocks."""
    buf = bytearray(_COUNTER)
    try:
        os.preadv(fd, [buf], -1, os.RWF_NOWAIT)
    except BlockingIOError:
        return None
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        # A kernel without RWF_NOWAIT for eventfds: poll, then read. Only another reader
        # racing us could make that read block.
        if not readable(fd):
            return None
        try:
            return int.from_bytes(os.read(fd, _COUNTER), "little")
        except BlockingIOError:
            return None
    return int.from_bytes(buf, "little")


def signal(fd: int) -> bool:
    """Add 1 to the counter; False when it is full (a notification is pending anyway)."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    if not poller.poll(0):
        return False
    try:
        os.eventfd_write(fd, 1)
    except BlockingIOError:
        return False
    return True
