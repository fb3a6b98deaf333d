"""Requests complete out of order (virtio 2.7.8): the queue worker returns each to the used ring
when it finishes, a stopping ring waits for every submitted request, and the inflight area
tracks exactly the ones still out. The device is the echo device holding requests until the
test completes them, from threads of their own, in the order the test picks."""

from __future__ import annotations

import os
import threading
import time

from tests.unit.test_connection import Backend, backend, buffers, ready
from vhost_user.protocol import codec
from vhost_user.ring.inflight import InflightArea

__all__ = ["backend"]


def _submit(b: Backend, n: int) -> list[int]:
    heads = []
    for i in range(n):
        rd, wr = buffers(0, i)
        text = f"req{i}".encode()
        b.memory.mem.write_at(rd, text)
        heads.append(b.driver(0).add([(rd, len(text), False), (wr, 0x100, True)]))
    b.fe.kick(0)
    deadline = time.monotonic() + 5
    while len(b.device.deferred) < n:
        assert time.monotonic() < deadline, "the worker did not submit every request"
        time.sleep(0.01)
    return heads


def _used(b: Backend, n: int) -> list[tuple[int, int]]:
    got: list[tuple[int, int]] = []
    deadline = time.monotonic() + 5
    while len(got) < n:
        assert time.monotonic() < deadline, f"only {got} came back"
        got += b.driver(0).used()
        time.sleep(0.01)
    return got


def test_requests_come_back_in_the_order_they_complete(backend: Backend) -> None:
    b = backend
    ready(b)
    b.device.defer = True
    h = _submit(b, 3)
    assert b.driver(0).used() == []  # nothing completes by itself
    for head in (h[2], h[0], h[1]):
        b.device.complete(head)
    assert _used(b, 3) == [(h[2], 4), (h[0], 4), (h[1], 4)]
    assert b.memory.mem.read_at(buffers(0, 2)[1], 4) == b"REQ2"


def test_a_stopping_ring_waits_for_every_submitted_request(backend: Backend) -> None:
    """GET_VRING_BASE answers only once both held requests are back in the used ring, so the
    base it answers is exact."""
    b = backend
    ready(b)
    b.device.defer = True
    h = _submit(b, 2)
    answer: list[int] = []
    stopper = threading.Thread(target=lambda: answer.append(b.fe.get_vring_base(0)))
    stopper.start()
    time.sleep(0.3)
    assert not answer, "the ring stopped with requests still out"
    b.device.complete(h[1])
    time.sleep(0.1)
    assert not answer
    b.device.complete(h[0])
    stopper.join(5)
    assert answer == [2]
    assert sorted(b.driver(0).used()) == sorted([(h[0], 4), (h[1], 4)])


def test_the_inflight_area_holds_exactly_the_requests_still_out(backend: Backend) -> None:
    b = backend
    b.fe.handshake()
    reply = b.fe.request(codec.GetInflightFd(0, 0, 1, 64))
    assert isinstance(reply, codec.InflightReply)
    try:
        b.fe.call(codec.SetInflightFd(reply.mmap_size, 0, 1, 64, reply.fd))
        ready(b)
        b.device.defer = True
        h = _submit(b, 4)
        b.device.complete(h[2])
        b.device.complete(h[0])
        assert _used(b, 2) == [(h[2], 4), (h[0], 4)]
        mine = InflightArea(reply.fd, reply.mmap_size, 0, 1, 64)
        try:
            region = mine.queues[0]
            assert region.in_flight() == sorted([h[1], h[3]])
            assert region.used_idx == 2
            # What a restarted backend would resubmit: the two still out, in pop order.
            pending, next_avail = region.recover(2, 64)
            assert pending == [h[1], h[3]] and next_avail == 4
        finally:
            mine.close()
        for head in (h[3], h[1]):
            b.device.complete(head)
        _used(b, 2)
    finally:
        os.close(reply.fd)
