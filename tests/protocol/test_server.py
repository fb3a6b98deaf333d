"""vhost_user.server: a real listening socket, front-ends that come and go, hostile ones, and
graceful stop. The device is the tests' echo device."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.protocol.echo_device import VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, EchoDevice
from tests.protocol.frontend import BUFFERS_GPA, Frontend, FrontendMemory, make_driver, ring_layout
from tests.protocol.hostile import HOSTILE, hostile
from tests.support.timed_call import TimedCall
from vhost_user.protocol import codec
from vhost_user.server import Server, serve

FEATURES = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | codec.VHOST_USER_F_PROTOCOL_FEATURES


@dataclass
class Running:
    path: str
    server: Server
    device: EchoDevice
    thread: threading.Thread

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(10)
        assert not self.thread.is_alive(), "serve_forever did not return after stop()"


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    path = str(tmp_path / "vhost.sock")
    device = EchoDevice()
    server = Server(path, device, message_timeout=1.0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    r = Running(path, server, device, thread)
    yield r
    device.gate.set()
    r.stop()


def good_session(path: str, text: bytes = b"ping") -> None:
    """A whole QEMU-like session: handshake, memory, one request, stop the ring, hang up."""
    memory = FrontendMemory()
    try:
        with Frontend.connect(path) as fe:
            fe.handshake()
            fe.set_features(FEATURES)
            fe.set_mem_table(memory)
            lay = ring_layout(0)
            driver = make_driver(memory.mem, lay, event_idx=True)
            fe.setup_vring(0, memory, size=lay.size, desc=lay.desc, avail=lay.avail, used=lay.used)
            memory.mem.write_at(BUFFERS_GPA, text)
            head = driver.add([(BUFFERS_GPA, len(text), False), (BUFFERS_GPA + 0x100, 64, True)])
            fe.kick(0)
            assert fe.wait_call(0)
            assert driver.used() == [(head, len(text))]
            assert memory.mem.read_at(BUFFERS_GPA + 0x100, len(text)) == text.upper()
            fe.set_vring_enable(0, False)
            assert fe.get_vring_base(0) == 1
    finally:
        memory.close()


def wait_until(predicate: object, timeout: float = 5.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_serves_frontends_one_after_another(running: Running) -> None:
    good_session(running.path, b"first")
    good_session(running.path, b"second")
    assert running.device.handled == 2


def test_second_concurrent_frontend_is_refused(running: Running) -> None:
    with Frontend.connect(running.path) as first:
        first.handshake()
        wait_until(lambda: running.server.connection is not None)
        second = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        second.settimeout(5)
        second.connect(running.path)
        assert second.recv(1) == b"", "the second front-end was not closed"
        second.close()
        assert first.get_queue_num() == 2
    good_session(running.path)


@pytest.mark.parametrize(("case", "match"), HOSTILE, ids=[c for c, _ in HOSTILE])
def test_hostile_frontend_then_good_one(running: Running, case: str, match: str) -> None:
    memory = FrontendMemory()
    try:
        with Frontend.connect(running.path) as fe:
            hostile(fe, memory, case)
            fe.transport.sock.settimeout(5)
            assert fe.transport.sock.recv(64) == b"", "the hostile front-end was not dropped"
    finally:
        memory.close()
    good_session(running.path)


def test_socket_closed_mid_message_then_good_one(running: Running) -> None:
    with Frontend.connect(running.path) as fe:
        fe.handshake()
        fe.send_raw(codec.serialize(codec.SetVringNum(0, 64))[:13])
    good_session(running.path)


def test_garbage_bytes_then_good_one(running: Running) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(running.path)
    sock.sendall(os.urandom(4096))
    sock.settimeout(5)
    try:
        assert sock.recv(1 << 16) is not None
    except ConnectionResetError:
        pass
    sock.close()
    good_session(running.path)


def test_stop_finishes_the_request_in_flight(running: Running) -> None:
    memory = FrontendMemory()
    fe = Frontend.connect(running.path)
    try:
        fe.handshake()
        fe.set_features(FEATURES)
        fe.set_mem_table(memory)
        lay = ring_layout(0)
        driver = make_driver(memory.mem, lay, event_idx=True)
        fe.setup_vring(0, memory, size=lay.size, desc=lay.desc, avail=lay.avail, used=lay.used)
        running.device.gate.clear()
        memory.mem.write_at(BUFFERS_GPA, b"inflight")
        head = driver.add([(BUFFERS_GPA, 8, False), (BUFFERS_GPA + 0x100, 64, True)])
        fe.kick(0)
        assert running.device.entered.acquire(timeout=5)
        running.server.stop()
        time.sleep(0.2)
        assert running.thread.is_alive(), "stopped before the request in flight finished"
        running.device.gate.set()
        running.thread.join(10)
        assert not running.thread.is_alive()
        assert driver.used() == [(head, 8)]
        assert running.device.quiesced >= 1
        assert not os.path.exists(running.path)
    finally:
        fe.close()
        memory.close()


def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = str(tmp_path / "stale.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()  # the file stays, nobody listens
    with Server(path, EchoDevice()) as server:
        assert server.socket_path == path
        assert os.path.exists(path)
    assert not os.path.exists(path)


def test_live_socket_is_not_clobbered(running: Running) -> None:
    with pytest.raises(FileExistsError):
        Server(running.path, EchoDevice())
    good_session(running.path)


def test_regular_file_is_not_clobbered(tmp_path: Path) -> None:
    path = tmp_path / "not-a-socket"
    path.write_text("precious")
    with pytest.raises(FileExistsError):
        Server(str(path), EchoDevice())
    assert path.read_text() == "precious"


def test_serve_with_stop_event_and_factory(tmp_path: Path) -> None:
    path = str(tmp_path / "factory.sock")
    made: list[EchoDevice] = []

    def factory() -> EchoDevice:
        made.append(EchoDevice())
        return made[-1]

    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(path, factory), kwargs={"stop": stop})
    thread.start()
    wait_until(lambda: os.path.exists(path))
    good_session(path)
    good_session(path)
    stop.set()
    thread.join(5)
    assert not thread.is_alive()
    assert len(made) == 2 and all(d.handled == 1 for d in made)


def test_serve_with_stop_fd(tmp_path: Path) -> None:
    path = str(tmp_path / "fd.sock")
    r, w = os.pipe()
    try:
        thread = threading.Thread(target=serve, args=(path, EchoDevice()), kwargs={"stop": r})
        thread.start()
        wait_until(lambda: os.path.exists(path))
        good_session(path)
        os.write(w, b"x")
        thread.join(5)
        assert not thread.is_alive()
    finally:
        os.close(r)
        os.close(w)


def test_unanswered_config_change_does_not_hold_up_the_next_frontend(running: Running) -> None:
    """notify_config_change waits up to the backend channel's timeout for the front-end's
    answer. If that front-end hangs up meanwhile, its connection ends at once (the wait with
    it), and the next front-end is served without waiting for the timeout."""
    fe = Frontend.connect(running.path)
    fe.handshake()
    assert fe.backend_channel is not None  # never read nor answered
    channel, fe.backend_channel = fe.backend_channel, None
    notify = TimedCall(running.server.notify_config_change)
    try:
        time.sleep(0.3)
        fe.get_features()  # the connection is served meanwhile
        fe.close()
        t0 = time.monotonic()
        with Frontend.connect(running.path) as second:
            second.get_features()
        assert time.monotonic() - t0 < 2.0
        delivered, took = notify.result()
        assert delivered is False and took < 2.0
    finally:
        channel.close()
