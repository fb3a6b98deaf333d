"""Dirty logging for live migration: memory.dirty_log on its own, and through a connection
driven by the Python front-end (SET_LOG_BASE, LOG_ALL on and off, VRING_F_LOG): the pages the
backend writes, data and used ring, are marked while logging is on, and nothing else."""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from memory import GuestMemoryError
from memory.dirty_log import VHOST_LOG_PAGE, DirtyLog
from tests.protocol.frontend import ring_layout
from tests.unit.test_connection import FEATURES, Backend, backend, buffers, echo, ready
from vhost_user.protocol import codec

__all__ = ["backend"]  # the fixture, imported for use here


def _memfd(size: int) -> int:
    fd = os.memfd_create("log", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    return fd


@pytest.fixture
def log_fd() -> Iterator[int]:
    fd = _memfd(8192)
    try:
        yield fd
    finally:
        os.close(fd)


def _bits(fd: int, size: int, offset: int = 0) -> bytes:
    with mmap.mmap(fd, offset + size, mmap.MAP_SHARED, mmap.PROT_READ) as m:
        return bytes(m[offset : offset + size])


def _pages(bits: bytes) -> set[int]:
    return {i * 8 + b for i, byte in enumerate(bits) for b in range(8) if byte >> b & 1}


@given(st.integers(0, 100 * VHOST_LOG_PAGE), st.integers(1, 40 * VHOST_LOG_PAGE))
def test_mark_sets_exactly_the_pages_touched(gpa: int, length: int) -> None:
    fd = _memfd(4096)
    try:
        log = DirtyLog(fd, 64, 4032)  # an unaligned offset into the file
        log.mark(gpa, length)
        want = set(range(gpa // VHOST_LOG_PAGE, (gpa + length - 1) // VHOST_LOG_PAGE + 1))
        assert _pages(_bits(fd, 64, 4032)) == want
        assert _bits(fd, 4032) == bytes(4032)  # nothing outside the log
        log.close()
    finally:
        os.close(fd)


def test_pages_past_the_log_are_counted_not_written(log_fd: int) -> None:
    log = DirtyLog(log_fd, 2, 0)  # 16 pages
    log.mark(14 * VHOST_LOG_PAGE, 4 * VHOST_LOG_PAGE)
    log.mark(100 * VHOST_LOG_PAGE, 1)
    assert _pages(_bits(log_fd, 2)) == {14, 15}
    assert log.beyond == 3
    assert _bits(log_fd, 8190, 2) == bytes(8190)
    log.close()
    log.close()
    log.mark(0, 1)  # after close: dropped, no crash


def test_threads_marking_one_byte_lose_no_bit(log_fd: int) -> None:
    log = DirtyLog(log_fd, 8192, 0)
    start = threading.Barrier(8)

    def mark(bit: int) -> None:
        start.wait(5)
        for byte in range(2000):
            log.mark((byte * 8 + bit) * VHOST_LOG_PAGE, 1)

    threads = [threading.Thread(target=mark, args=(bit,)) for bit in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert _bits(log_fd, 2000) == b"\xff" * 2000
    log.close()


@pytest.mark.parametrize(
    ("size", "offset", "match"),
    [
        (0, 0, "size 0x0"),
        (1 << 31, 0, "size"),
        (8192, 1, "past the end of its file"),
        (16, 1 << 40, "offset"),
    ],
)
def test_bad_log_descriptions_are_refused(log_fd: int, size: int, offset: int, match: str) -> None:
    with pytest.raises(GuestMemoryError, match=match):
        DirtyLog(log_fd, size, offset)


def test_a_pipe_is_no_log() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(GuestMemoryError, match="not a regular file"):
            DirtyLog(r, 16, 0)
    finally:
        os.close(r)
        os.close(w)


# -- through a connection ---------------------------------------------------------------------

LOG_SIZE = (4 << 20) // VHOST_LOG_PAGE // 8  # the front-end's 4 MiB of guest memory


def _used_pages(q: int) -> set[int]:
    lay = ring_layout(q)
    end = lay.used + 6 + 8 * lay.size
    return set(range(lay.used // VHOST_LOG_PAGE, (end - 1) // VHOST_LOG_PAGE + 1))


def test_writes_are_logged_only_while_log_all_is_on(backend: Backend) -> None:
    b = backend
    fd = _memfd(LOG_SIZE)
    try:
        b.fe.handshake()
        reply = b.fe.request(codec.SetLogBase(LOG_SIZE, 0, fd))
        assert reply == codec.LogBaseReply()
        b.fe.set_features(FEATURES | codec.VHOST_F_LOG_ALL)
        b.fe.set_mem_table(b.memory)
        b.driver(0)
        lay = ring_layout(0)
        b.fe.setup_vring(
            0, b.memory, size=lay.size, desc=lay.desc, avail=lay.avail, used=lay.used, log=True
        )
        head = echo(b, 0, b"logged")
        assert b.driver(0).used() == [(head, 6)]
        _rd, wr = buffers(0)
        marked = _pages(_bits(fd, LOG_SIZE))
        assert wr // VHOST_LOG_PAGE in marked
        assert marked & _used_pages(0)
        # Only pages we wrote: the request's readable buffer and the descriptor table are not.
        assert lay.desc // VHOST_LOG_PAGE not in marked or lay.desc // VHOST_LOG_PAGE in (
            _used_pages(0) | {wr // VHOST_LOG_PAGE}
        )
        # Logging off: nothing more is marked. The ring is stopped before the log is cleared
        # (the worker's trailing avail_event store of the logged request would race it), then
        # set up again as QEMU does after a migration that was cancelled.
        b.fe.set_features(FEATURES)
        b.fe.get_features()  # QEMU's round trip: SET_FEATURES is handled before it looks
        base = b.fe.get_vring_base(0)
        with mmap.mmap(fd, LOG_SIZE) as m:
            m[:] = bytes(LOG_SIZE)
        b.fe.setup_vring(
            0, b.memory, size=lay.size, desc=lay.desc, avail=lay.avail, used=lay.used, base=base
        )
        head = echo(b, 0, b"not logged", n=1)
        assert b.driver(0).used() == [(head, 10)]
        assert _bits(fd, LOG_SIZE) == bytes(LOG_SIZE)
    finally:
        os.close(fd)


def test_log_base_without_log_shmfd_is_refused(backend: Backend) -> None:
    b = backend
    b.fe.handshake(want_protocol=~int(codec.ProtocolFeature.LOG_SHMFD))
    fd = _memfd(LOG_SIZE)
    try:
        b.fe.send(codec.SetLogBase(LOG_SIZE, 0, fd))
    finally:
        os.close(fd)
    b.expect_dropped("without LOG_SHMFD negotiated")


def test_used_ring_log_address_must_match(backend: Backend) -> None:
    b = backend
    ready(b, queues=())
    lay = ring_layout(0)
    b.fe.send(codec.SetVringNum(0, lay.size))
    b.fe.send(
        codec.SetVringAddr(
            0,
            codec.VRING_F_LOG,
            b.memory.uva(lay.desc),
            b.memory.uva(lay.used),
            b.memory.uva(lay.avail),
            lay.used + 4096,
        )
    )
    b.expect_dropped("is not the used ring's guest address")
