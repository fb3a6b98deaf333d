"""vhost_user.connection over a real socketpair, driven by the Python front-end with memfd
guest memory and real eventfds; the device is the tests' echo device."""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from memory import GuestMemory
from tests.protocol.echo_device import BOOM, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, EchoDevice
from tests.protocol.frontend import (
    BUFFERS_GPA,
    DEFAULT_LAYOUT,
    BackendRefused,
    Driver,
    Frontend,
    FrontendMemory,
    MiB,
    RegionSpec,
    make_driver,
    ring_layout,
)
from tests.protocol.hostile import HOSTILE, hostile
from tests.support.timed_call import TimedCall
from vhost_user import eventfd
from vhost_user.connection import MAX_MEM_SLOTS, OFFERED_PROTOCOL_FEATURES, Connection
from vhost_user.errors import ConnectionClosed, FrontendProtocolError
from vhost_user.protocol import codec
from vhost_user.queue_worker import STUCK_LIMIT, QueueWorker
from vhost_user.ring.split import SplitVirtqueue
from vhost_user.ring.virtqueue import Virtqueue, VirtqueueFactory

FEATURES = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | codec.VHOST_USER_F_PROTOCOL_FEATURES


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


@dataclass
class Backend:
    fe: Frontend
    device: EchoDevice
    conn: Connection
    thread: threading.Thread
    result: list[FrontendProtocolError | None]
    memory: FrontendMemory
    drivers: dict[int, Driver] = field(default_factory=dict)

    def driver(self, q: int) -> Driver:
        if q not in self.drivers:
            self.drivers[q] = make_driver(self.memory.mem, ring_layout(q), event_idx=True)
        return self.drivers[q]

    def finish(self, timeout: float = 5.0) -> FrontendProtocolError | None:
        """Wait for the connection thread to end; its run() result."""
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "connection thread did not end"
        return self.result[0]

    def expect_dropped(self, match: str) -> None:
        error = self.finish()
        assert isinstance(error, FrontendProtocolError), error
        assert match in str(error), str(error)
        with pytest.raises(ConnectionClosed):
            self.fe.transport.receive_raw()


@pytest.fixture
def backend() -> Iterator[Backend]:
    before = open_fds()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    device = EchoDevice()
    conn = Connection(theirs, device, message_timeout=2.0)
    result: list[FrontendProtocolError | None] = [None]

    def run() -> None:
        result[0] = conn.run()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    memory = FrontendMemory()
    fe = Frontend(ours, timeout=5.0)
    b = Backend(fe, device, conn, thread, result, memory)
    yield b
    device.gate.set()
    fe.close()
    b.finish()
    memory.close()
    assert conn.memory is None
    assert open_fds() <= before, "the connection leaked fds"


def ready(b: Backend, *, features: int = FEATURES, queues: tuple[int, ...] = (0,)) -> None:
    b.fe.handshake()
    b.fe.set_features(features)
    b.fe.set_mem_table(b.memory)
    for q in queues:
        b.driver(q)
        lay = ring_layout(q)
        b.fe.setup_vring(q, b.memory, size=lay.size, desc=lay.desc, avail=lay.avail, used=lay.used)


def buffers(q: int, n: int = 0) -> tuple[int, int]:
    """A readable and a writable buffer gpa for request ``n`` of queue ``q``."""
    base = BUFFERS_GPA + (q * 64 + n) * 0x200
    return base, base + 0x100


def echo(b: Backend, q: int, text: bytes, n: int = 0, *, wait: bool = True) -> int:
    rd, wr = buffers(q, n)
    b.memory.mem.write_at(rd, text)
    head = b.driver(q).add([(rd, len(text), False), (wr, 0x100, True)])
    b.fe.kick(q)
    if wait:
        wait_used(b, q)
    return head


def wait_used(b: Backend, q: int) -> None:
    """Wait for a used-buffer notification that comes with used entries (the backend may
    also signal spuriously, e.g. once on a new call fd)."""
    deadline = time.monotonic() + 5
    while True:
        assert b.fe.wait_call(q, timeout=max(0.0, deadline - time.monotonic())), "no notification"
        if b.driver(q).has_used():
            return


# -- handshake -------------------------------------------------------------------------------


def test_qemu_handshake_answers(backend: Backend) -> None:
    features = backend.fe.handshake()
    assert features == VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | (1 << 30)
    assert backend.fe.offered_features == features | codec.VHOST_F_LOG_ALL
    assert backend.fe.protocol_features == OFFERED_PROTOCOL_FEATURES
    assert backend.fe.queue_num == 2
    assert backend.fe.max_mem_slots == MAX_MEM_SLOTS
    assert backend.fe.config == bytes(range(60))
    backend.fe.set_features(FEATURES)
    assert backend.device.acked == VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
    assert backend.conn.owner


def test_get_config_past_the_layout_reads_zero(backend: Backend) -> None:
    backend.fe.handshake()
    assert backend.fe.get_config(60, 8) == bytes([60, 61, 62, 63, 0, 0, 0, 0])


def test_set_config_reaches_the_device(backend: Backend) -> None:
    backend.fe.handshake()
    backend.fe.call(codec.SetConfig(4, b"\xaa\xbb"))
    assert backend.fe.get_config(3, 4) == bytes([3, 0xAA, 0xBB, 6])


# -- data path -------------------------------------------------------------------------------


def test_request_round_trip_and_vring_base(backend: Backend) -> None:
    ready(backend)
    head = echo(backend, 0, b"hello, ring")
    assert backend.driver(0).used() == [(head, 11)]
    _, wr = buffers(0)
    assert backend.memory.mem.read_at(wr, 11) == b"HELLO, RING"
    assert backend.fe.get_vring_base(0) == 1
    assert backend.device.quiesced == 1


def test_many_requests_in_one_batch(backend: Backend) -> None:
    ready(backend)
    backend.device.gate.clear()
    heads = []
    for n in range(30):
        rd, wr = buffers(0, n)
        backend.memory.mem.write_at(rd, b"x%d" % n)
        heads.append(backend.driver(0).add([(rd, len(b"x%d" % n), False), (wr, 0x100, True)]))
    backend.fe.kick(0)
    backend.device.gate.set()
    got: list[tuple[int, int]] = []
    deadline = time.monotonic() + 5
    while len(got) < 30 and time.monotonic() < deadline:
        backend.fe.wait_call(0, timeout=0.5)
        got += backend.driver(0).used()
    assert sorted(h for h, _ in got) == sorted(heads)
    assert backend.fe.get_vring_base(0) == 30


def test_ring_waits_for_enable_when_protocol_features_acked(backend: Backend) -> None:
    backend.fe.handshake()
    backend.fe.set_features(FEATURES)
    backend.fe.set_mem_table(backend.memory)
    lay = ring_layout(0)
    backend.driver(0)
    backend.fe.setup_vring(
        0,
        backend.memory,
        size=lay.size,
        desc=lay.desc,
        avail=lay.avail,
        used=lay.used,
        enable=False,
    )
    echo(backend, 0, b"early", wait=False)
    assert not backend.fe.wait_call(0, timeout=0.3)
    assert backend.driver(0).used() == []
    backend.fe.set_vring_enable(0, True)
    wait_used(backend, 0)
    assert len(backend.driver(0).used()) == 1


def test_ring_enabled_from_start_without_protocol_features(backend: Backend) -> None:
    ready(backend, features=VIRTIO_F_VERSION_1)
    backend.fe.set_vring_enable(0, False)  # ignored: PROTOCOL_FEATURES not acked
    head = echo(backend, 0, b"legacy")
    assert backend.driver(0).used() == [(head, 6)]


def test_queues_run_concurrently(backend: Backend) -> None:
    ready(backend, queues=(0, 1))
    backend.device.gate.clear()
    echo(backend, 0, b"q0", wait=False)
    echo(backend, 1, b"q1", wait=False)
    assert backend.device.entered.acquire(timeout=5)
    assert backend.device.entered.acquire(timeout=5), "second queue stalled behind the first"
    backend.device.gate.set()
    wait_used(backend, 0)
    wait_used(backend, 1)
    assert len(backend.device.threads) == 2


def test_get_vring_base_waits_for_the_request_in_flight(backend: Backend) -> None:
    ready(backend)
    backend.device.gate.clear()
    head = echo(backend, 0, b"slow", wait=False)
    assert backend.device.entered.acquire(timeout=5)
    base: list[int] = []
    getter = threading.Thread(target=lambda: base.append(backend.fe.get_vring_base(0)))
    getter.start()
    time.sleep(0.2)
    assert base == [], "GET_VRING_BASE answered while a request was in flight"
    backend.device.gate.set()
    getter.join(5)
    assert base == [1]
    assert backend.driver(0).used() == [(head, 4)]


def test_disable_then_get_vring_base_like_qemu_7_2_quiesces(backend: Backend) -> None:
    ready(backend)
    echo(backend, 0, b"x")
    backend.fe.set_vring_enable(0, False)
    assert backend.fe.get_vring_base(0) == 1
    assert backend.device.quiesced == 1


def test_restart_after_get_vring_base_resumes_at_base(backend: Backend) -> None:
    ready(backend)
    echo(backend, 0, b"one")
    backend.driver(0).used()
    base = backend.fe.get_vring_base(0)
    lay = ring_layout(0)
    backend.fe.setup_vring(
        0, backend.memory, size=lay.size, desc=lay.desc, avail=lay.avail, used=lay.used, base=base
    )
    head = echo(backend, 0, b"two", n=1)
    assert backend.driver(0).used() == [(head, 3)]


def test_a_resumed_ring_signals_once_before_any_new_request(backend: Backend) -> None:
    """A backend killed between pushing used entries and signalling them leaves the driver
    asleep on entries it was never told about (the restart hang of issue 11): a ring that
    starts with a used index past 0 signals once, unasked, and a fresh ring does not."""
    ready(backend)
    assert not backend.fe.wait_call(0, timeout=0.3), "a fresh ring signalled"
    echo(backend, 0, b"one")
    backend.driver(0).used()
    # QEMU 7.2's stop and start (as on a reconnect to a new backend): disable, GET_VRING_BASE,
    # then NUM, BASE, ADDR, KICK, CALL with the ring stopped, and ENABLE last, so the new call
    # fd comes before the worker (no "new call fd" signal covers it).
    backend.fe.set_vring_enable(0, False)
    base = backend.fe.get_vring_base(0)
    lay = ring_layout(0)
    backend.fe.setup_vring(
        0, backend.memory, size=lay.size, desc=lay.desc, avail=lay.avail, used=lay.used, base=base
    )
    assert backend.fe.wait_call(0, timeout=5), "the resumed ring never signalled"
    assert not backend.driver(0).has_used()  # nothing new: the signal is for the old entries


def test_call_fd_swapped_while_running(backend: Backend) -> None:
    ready(backend)
    new_call = os.eventfd(0, os.EFD_NONBLOCK)
    old = backend.fe.vrings[0].call
    backend.fe.call(codec.SetVringCall(0, new_call))
    backend.fe.vrings[0].call = new_call
    os.close(old)
    # The backend signals a new call fd once, like libvhost-user (from the worker, so
    # possibly just after the ack).
    poller = select.poll()
    poller.register(new_call, select.POLLIN)
    assert poller.poll(5000), "no signal on the new call fd"
    os.eventfd_read(new_call)
    echo(backend, 0, b"after swap")
    assert len(backend.driver(0).used()) == 1


def test_add_and_remove_memory_while_running(backend: Backend) -> None:
    ready(backend)
    fd = os.memfd_create("hotplug")
    os.ftruncate(fd, 1 * MiB)
    region = codec.MemRegion(8 * MiB, 1 * MiB, 0x7E00_0000_0000, 0)
    backend.fe.add_mem_reg(region, fd)
    echo(backend, 0, b"after add")
    assert len(backend.driver(0).used()) == 1
    backend.fe.rem_mem_reg(region)
    echo(backend, 0, b"after remove", n=1)
    assert len(backend.driver(0).used()) == 1
    os.close(fd)
    assert len(backend.conn.regions) == 2


def test_set_mem_table_while_running_keeps_the_ring_position(backend: Backend) -> None:
    ready(backend)
    echo(backend, 0, b"first")
    backend.driver(0).used()
    backend.fe.set_mem_table(backend.memory)
    echo(backend, 0, b"second", n=1)
    assert backend.driver(0).used()[0][1] == 6
    assert backend.fe.get_vring_base(0) == 2


def test_notify_config_change_over_backend_channel(backend: Backend) -> None:
    backend.fe.handshake()
    channel = backend.fe.backend_channel
    assert channel is not None
    result: list[bool] = []
    t = threading.Thread(target=lambda: result.append(backend.conn.notify_config_change()))
    t.start()
    from vhost_user.transport import Transport

    side = Transport(channel, message_timeout=5)
    header, payload, fds = side.receive_raw()
    msg = codec.parse_backend_request(header, payload, fds)
    assert msg == codec.ConfigChangeMsg(need_reply=True)
    side.send_reply(codec.U64Reply(codec.BackendRequest.CONFIG_CHANGE_MSG, 0))
    t.join(5)
    assert result == [True]


def test_unanswered_config_change_does_not_block_the_connection(backend: Backend) -> None:
    """The front-end never answers CONFIG_CHANGE_MSG: meanwhile the connection keeps serving,
    a new backend channel is taken at once, and the waiting notification ends with it."""
    backend.fe.handshake()
    first = backend.fe.backend_channel
    assert first is not None
    notify = TimedCall(backend.conn.notify_config_change)
    try:
        time.sleep(0.3)
        t0 = time.monotonic()
        backend.fe.set_backend_req_fd()  # acked: the connection thread did not wait
        assert time.monotonic() - t0 < 1.0
        delivered, took = notify.result()
        assert delivered is False and took < 2.0
    finally:
        first.close()


# -- the guest misbehaves: the queue (at worst) fails, the connection goes on ----------------


def test_descriptor_outside_memory_fails_only_that_request(backend: Backend) -> None:
    ready(backend)
    head = backend.driver(0).add([(1 * MiB + 0x100, 16, False)])  # in the hole
    backend.fe.kick(0)
    wait_used(backend, 0)
    assert backend.driver(0).used() == [(head, 0)]
    assert len(backend.device.faults) == 1
    head = echo(backend, 0, b"still fine", n=1)
    assert backend.driver(0).used() == [(head, 10)]


def test_device_exception_breaks_only_its_queue(backend: Backend) -> None:
    ready(backend, queues=(0, 1))
    echo(backend, 0, BOOM, wait=False)
    time.sleep(0.3)
    head = echo(backend, 1, b"other queue", n=1)
    assert backend.driver(1).used() == [(head, 11)]
    assert backend.fe.get_features() & (1 << 30)
    assert backend.driver(0).used() == []
    # The front-end resets the broken queue (stop, set up again): it runs again.
    base = backend.fe.get_vring_base(0)
    assert base == 1
    lay = ring_layout(0)
    backend.fe.setup_vring(
        0, backend.memory, size=lay.size, desc=lay.desc, avail=lay.avail, used=lay.used, base=base
    )
    head = echo(backend, 0, b"works again", n=2)
    assert backend.driver(0).used() == [(head, 11)]


def test_broken_avail_index_breaks_only_its_queue(backend: Backend) -> None:
    ready(backend, queues=(0, 1))
    lay = ring_layout(0)
    backend.memory.mem.write_u16(lay.avail + 2, 1000)  # 1000 entries "available" in 64 slots
    backend.fe.kick(0)
    time.sleep(0.3)
    head = echo(backend, 1, b"other queue", n=1)
    assert backend.driver(1).used() == [(head, 11)]
    assert backend.fe.get_queue_num() == 2


# -- the front-end misbehaves: error reply if asked, connection dropped, nothing leaked -------


def test_disconnect_stops_everything(backend: Backend) -> None:
    ready(backend, queues=(0, 1))
    echo(backend, 0, b"x")
    backend.fe.close()
    assert backend.finish() is None
    assert backend.device.quiesced >= 1
    assert all(r.worker is None for r in backend.conn.rings)


def test_error_is_acked_with_failure_then_dropped(backend: Backend) -> None:
    backend.fe.handshake()
    reply = backend.fe.request(codec.SetVringNum(0, 3, need_reply=True))
    assert isinstance(reply, codec.U64Reply) and reply.value != 0
    backend.expect_dropped("power of two")


def test_failed_get_config_gets_an_empty_reply(backend: Backend) -> None:
    backend.fe.handshake()
    assert backend.fe.get_config(4000, 200) == b""
    backend.expect_dropped("GetConfig")


@pytest.mark.parametrize(("case", "match"), HOSTILE, ids=[c for c, _ in HOSTILE])
def test_hostile_frontend_is_dropped(backend: Backend, case: str, match: str) -> None:
    hostile(backend.fe, backend.memory, case)
    backend.expect_dropped(match)


def _broken_factory(
    memory: GuestMemory,
    size: int,
    desc_gpa: int,
    avail_gpa: int,
    used_gpa: int,
    *,
    event_idx: bool,
    next_avail_idx: int = 0,
    used_idx: int | None = None,
    inflight: object = None,
) -> Virtqueue:
    raise ValueError("a bug of ours")


@pytest.mark.parametrize("where", ["virtqueue factory", "device config read"])
def test_a_bug_of_ours_is_not_blamed_on_the_frontend(
    where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ValueError is local misuse (vhost_user.errors): one escaping a handler, for values the
    front-end sent correctly, still tells the front-end its request failed and ends the
    connection, but propagates as itself (the server logs it as ours) instead of passing for a
    FrontendProtocolError."""
    before = open_fds()
    device = EchoDevice()
    factory: VirtqueueFactory = _broken_factory if where == "virtqueue factory" else SplitVirtqueue
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    conn = Connection(theirs, device, message_timeout=2.0, virtqueue_factory=factory)
    returned: list[FrontendProtocolError | None] = []
    raised: list[BaseException] = []

    def run() -> None:
        try:
            returned.append(conn.run())
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    memory = FrontendMemory()
    fe = Frontend(ours, timeout=5.0)
    try:
        fe.handshake()
        fe.set_features(FEATURES)
        if where == "virtqueue factory":
            fe.set_mem_table(memory)
            lay = ring_layout(0)
            fe.call(codec.SetVringNum(0, lay.size))
            fe.call(
                codec.SetVringAddr(
                    0, 0, memory.uva(lay.desc), memory.uva(lay.used), memory.uva(lay.avail), 0
                )
            )
            kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            try:
                fe.call(codec.SetVringKick(0, kick))
            finally:
                os.close(kick)
            with pytest.raises(BackendRefused):
                fe.set_vring_enable(0, True)  # the ring starts: the factory raises
        else:

            def broken_read_config(offset: int, size: int) -> bytes:
                raise ValueError("a bug of ours")

            monkeypatch.setattr(device, "read_config", broken_read_config)
            assert fe.get_config(0, 8) == b""  # inside the config space: the device's bug
        thread.join(5)
        assert not thread.is_alive(), "connection thread did not end"
        assert returned == [], "a bug of ours was blamed on the front-end"
        assert len(raised) == 1 and type(raised[0]) is ValueError, raised
        assert "a bug of ours" in str(raised[0])
        with pytest.raises(ConnectionClosed):
            fe.transport.receive_raw()
    finally:
        fe.close()
        thread.join(5)
        memory.close()
    assert conn.memory is None
    assert open_fds() <= before, "the connection leaked fds"


def test_truncated_message_drops_the_connection(backend: Backend) -> None:
    backend.fe.handshake()
    backend.fe.send_raw(codec.serialize(codec.SetVringNum(0, 64))[:15])
    backend.fe.transport.sock.shutdown(socket.SHUT_WR)
    backend.expect_dropped("middle of a message")


def test_region_specs_used_by_tests_have_a_hole() -> None:
    specs: tuple[RegionSpec, ...] = DEFAULT_LAYOUT
    assert specs[0].guest_phys_addr + specs[0].size < specs[1].guest_phys_addr
    assert all(s.userspace_addr != s.guest_phys_addr for s in specs)


# -- a front-end that turns its eventfds against us ------------------------------------------

FULL_COUNTER = 0xFFFF_FFFF_FFFF_FFFE


def test_worker_kept_blocked_on_its_call_fd_is_abandoned(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The front-end cleared O_NONBLOCK on its call fd, filled it between our poll and our
    write, and refills it as fast as we drain it (simulated: the unjam never helps, the
    write goes straight in). GET_VRING_BASE must still answer, within STUCK_LIMIT."""
    ready(backend)
    call = backend.fe.vrings[0].call
    os.set_blocking(call, True)
    monkeypatch.setattr(QueueWorker, "_unjam_call", lambda self: None)
    monkeypatch.setattr(eventfd, "signal", lambda fd: os.eventfd_write(fd, 1) or True)
    worker = backend.conn.rings[0].worker
    assert worker is not None
    os.eventfd_write(call, FULL_COUNTER)
    head = echo(backend, 0, b"blocked", wait=False)
    deadline = time.monotonic() + 5
    while not worker._call_writing:
        assert time.monotonic() < deadline, "the worker never tried to signal"
        time.sleep(0.01)
    t0 = time.monotonic()
    assert backend.fe.get_vring_base(0) == 1
    assert STUCK_LIMIT <= time.monotonic() - t0 < STUCK_LIMIT + 2
    assert worker.abandoned and backend.driver(0).used() == [(head, 7)]
    os.eventfd_read(call)  # the front-end relents: the abandoned thread ends
    worker._thread.join(5)
    assert not worker.alive


def test_semaphore_kick_fd_breaks_its_queue_where_fdinfo_cannot_tell(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kernels before 6.5 do not say in fdinfo whether an eventfd is a semaphore: a kick fd
    that never empties is then caught by its behaviour, and only its queue stops."""
    monkeypatch.setattr(eventfd, "_is_semaphore", lambda fd: False)
    ready(backend, queues=(0, 1))
    semaphore = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK | os.EFD_SEMAPHORE)
    try:
        backend.fe.call(codec.SetVringKick(0, semaphore))
        worker = backend.conn.rings[0].worker
        assert worker is not None
        os.eventfd_write(semaphore, FULL_COUNTER)
        worker._thread.join(10)
        assert not worker.alive and worker.broken
        head = echo(backend, 1, b"other queue", n=1)
        assert backend.driver(1).used() == [(head, 11)]
    finally:
        os.close(semaphore)
