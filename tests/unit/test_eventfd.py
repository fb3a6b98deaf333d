"""vhost_user.eventfd against real eventfds the "front-end" made as awkward as it can."""

from __future__ import annotations

import os

import pytest

from vhost_user import eventfd
from vhost_user.errors import FrontendProtocolError

FULL = 0xFFFF_FFFF_FFFF_FFFE


def test_blocking_fds_never_block_us() -> None:
    fd = os.eventfd(0, os.EFD_CLOEXEC)  # blocking, and the flag is on the shared description
    try:
        assert eventfd.drain(fd) is None  # empty: EAGAIN, not a hang
        assert eventfd.signal(fd) and eventfd.signal(fd)
        assert eventfd.drain(fd) == 2 and eventfd.drain(fd) is None
        os.eventfd_write(fd, FULL)
        assert eventfd.signal(fd) is False  # full: a notification is pending already
        assert eventfd.drain(fd) == FULL
    finally:
        os.close(fd)


def test_check_takes_plain_eventfds_only() -> None:
    plain = os.eventfd(0, os.EFD_CLOEXEC)
    semaphore = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_SEMAPHORE)
    r, w = os.pipe()
    try:
        assert eventfd.check(plain, "KICK") == plain
        assert not os.get_blocking(plain)
        with pytest.raises(FrontendProtocolError, match="EFD_SEMAPHORE"):
            eventfd.check(semaphore, "KICK")
        for fd in (r, w, 12345):
            with pytest.raises(FrontendProtocolError, match="not an eventfd"):
                eventfd.check(fd, "CALL")
    finally:
        for fd in (plain, semaphore, r, w):
            os.close(fd)
