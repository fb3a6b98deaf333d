"""GET_INFLIGHT_FD / SET_INFLIGHT_FD through a connection: the area the backend creates, what
it records while serving, and hostile areas (the front-end is dropped, nothing mapped)."""

from __future__ import annotations

import os

from tests.protocol.frontend import ring_layout
from tests.unit.test_connection import Backend, backend, echo, ready
from vhost_user.protocol import codec
from vhost_user.ring.inflight import InflightArea, queue_region_size

__all__ = ["backend"]


def test_the_area_records_what_the_ring_serves(backend: Backend) -> None:
    b = backend
    b.fe.handshake()
    reply = b.fe.request(codec.GetInflightFd(0, 0, 1, 64))
    assert isinstance(reply, codec.InflightReply)
    assert reply.mmap_size == queue_region_size(64) and reply.mmap_offset == 0
    try:
        assert os.fstat(reply.fd).st_size >= reply.mmap_size
        b.fe.call(codec.SetInflightFd(reply.mmap_size, 0, 1, 64, reply.fd))
        ready(b, queues=())
        b.driver(0)
        lay = ring_layout(0)
        b.fe.setup_vring(0, b.memory, size=lay.size, desc=lay.desc, avail=lay.avail, used=lay.used)
        head = echo(b, 0, b"tracked")
        assert b.driver(0).used() == [(head, 7)]
        mine = InflightArea(reply.fd, reply.mmap_size, 0, 1, 64)
        try:
            assert mine.queues[0].in_flight() == []
            assert mine.queues[0].used_idx == 1
        finally:
            mine.close()
    finally:
        os.close(reply.fd)


def test_an_area_too_small_for_its_queues_is_refused(backend: Backend) -> None:
    b = backend
    b.fe.handshake()
    fd = os.memfd_create("small", os.MFD_CLOEXEC)
    os.ftruncate(fd, 64)
    try:
        b.fe.send(codec.SetInflightFd(64, 0, 1, 128, fd))
    finally:
        os.close(fd)
    b.expect_dropped("does not hold 1 queues of 128 entries")


def test_inflight_without_the_feature_is_refused(backend: Backend) -> None:
    b = backend
    b.fe.handshake(want_protocol=~int(codec.ProtocolFeature.INFLIGHT_SHMFD))
    b.fe.send(codec.GetInflightFd(0, 0, 1, 64))
    b.expect_dropped("without INFLIGHT_SHMFD negotiated")
