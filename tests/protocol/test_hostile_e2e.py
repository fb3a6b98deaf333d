"""Hostile front-ends against the real ``vhost-user-blk serve`` process.

Every case ends with the fixture's health check (``ServeProcess.check_healthy``): the process
is alive, logged no crash, holds no fd of the dead connection, serves a fresh session on both
queues, and the image equals its shadow. The message-level cases of ``tests.protocol.hostile``
run here too, against the subprocess rather than an in-process server.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import signal
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from tests.protocol.frontend import Frontend, FrontendMemory, MiB, RegionSpec, ring_layout
from tests.protocol.hostile import HOSTILE, hostile
from tests.protocol.serve_process import (
    BIG_AREA,
    DWZ_SEG,
    SECTOR,
    SERIAL,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    BlkSession,
    ServeProcess,
)
from tests.support.driver_ring import VIRTQ_DESC_F_NEXT as NEXT
from tests.support.driver_ring import VIRTQ_DESC_F_WRITE as WRITE
from vhost_user.errors import ConnectionClosed, FrontendProtocolError
from vhost_user.protocol import codec

QUEUE_SIZE = 256
"""What the server is started with (``--queue-size``): ``hostile.py``'s "too big" is 512."""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    sp = ServeProcess(tmp_path_factory.mktemp("hostile-e2e"), queue_size=QUEUE_SIZE)
    yield sp
    rc = sp.stop()
    assert rc == 0, sp.log_text()
    assert not sp.crash_lines(), "\n".join(sp.crash_lines())
    assert sp.restarts == 0, "a test killed the server"
    sp.shadow.check()


@pytest.fixture
def srv(server: ServeProcess) -> Iterator[ServeProcess]:
    server.ensure_running()
    server.new_log()
    yield server
    server.check_healthy()


def assert_dropped(sock: socket.socket, timeout: float = 10.0) -> None:
    """The server closes the connection (replies before that are ignored)."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, "the server did not drop the connection"
        sock.settimeout(remaining)
        try:
            if sock.recv(4096) == b"":
                return
        except (ConnectionResetError, BrokenPipeError):
            return


def connected(path: str) -> tuple[Frontend, FrontendMemory]:
    return Frontend.connect(path), FrontendMemory()


# -- the message-level cases of hostile.py -----------------------------------------------------


@pytest.mark.parametrize(("case", "match"), HOSTILE, ids=[c for c, _ in HOSTILE])
def test_hostile_message(srv: ServeProcess, case: str, match: str) -> None:
    fe, memory = connected(srv.socket)
    try:
        hostile(fe, memory, case)
        assert_dropped(fe.transport.sock)
    finally:
        fe.close()
        memory.close()
    srv.wait_fds()
    assert match in srv.new_log()


# -- more of them ------------------------------------------------------------------------------


def _header(request: int, size: int, flags: int = codec.VERSION) -> bytes:
    return codec.HEADER.pack(request, flags, size)


def _mem_table(fe: Frontend, memory: FrontendMemory, regions: list[codec.MemRegion]) -> None:
    fe.send(codec.SetMemTable(tuple(regions), tuple(memory.fds[0] for _ in regions)))


def _region(
    gpa: int = 0, size: int = MiB, uva: int = 0x7F00_0000_0000, off: int = 0
) -> list[codec.MemRegion]:
    return [codec.MemRegion(gpa, size, uva, off)]


def _vring_addr(fe: Frontend, memory: FrontendMemory, desc: int, avail: int, used: int) -> None:
    fe.set_mem_table(memory)
    fe.call(codec.SetVringNum(0, 64))
    fe.send(codec.SetVringAddr(0, 0, desc, used, avail, 0))


Case = Callable[[Frontend, FrontendMemory], None]
lay = ring_layout(0)

EXTRA: dict[str, Case] = {
    "payload of 4097 bytes": lambda fe, m: fe.send_raw(_header(1, 4097) + bytes(64)),
    "payload of 2^32-1 bytes": lambda fe, m: fe.send_raw(_header(1, 0xFFFF_FFFF)),
    "protocol version 2": lambda fe, m: fe.send_raw(_header(1, 0, flags=2)),
    "version 0": lambda fe, m: fe.send_raw(_header(1, 0, flags=0)),
    "request code 0": lambda fe, m: fe.send_raw(_header(0, 0)),
    "request code 2^32-1": lambda fe, m: fe.send_raw(_header(0xFFFF_FFFF, 8) + bytes(8)),
    "request code 1000 with 4096 bytes": lambda fe, m: fe.send_raw(
        _header(1000, 4096) + bytes(4096)
    ),
    "SET_INFLIGHT_FD (never offered)": lambda fe, m: fe.send_raw(
        _header(codec.Request.SET_INFLIGHT_FD, 24) + bytes(24), [m.fds[0]]
    ),
    "9 fds": lambda fe, m: fe.send_raw(codec.serialize(codec.GetFeatures()), [m.fds[0]] * 9),
    "8 fds on GET_FEATURES": lambda fe, m: fe.send_raw(
        codec.serialize(codec.GetFeatures()), [m.fds[0]] * 8
    ),
    "SET_FEATURES payload of 4 bytes": lambda fe, m: fe.send_raw(
        _header(codec.Request.SET_FEATURES, 4) + bytes(4)
    ),
    "mem table: 2 regions, 1 fd": lambda fe, m: fe.send_raw(
        codec.serialize(codec.SetMemTable(m.regions(), tuple(m.fds)))[: 8 + 12 + 8 + 64], [m.fds[0]]
    ),
    "mem table: unaligned guest address": lambda fe, m: _mem_table(fe, m, _region(gpa=0x800)),
    "mem table: unaligned size": lambda fe, m: _mem_table(fe, m, _region(size=MiB + 0x800)),
    "mem table: unaligned user address": lambda fe, m: _mem_table(fe, m, _region(uva=0x7F00_0800)),
    "mem table: unaligned mmap offset": lambda fe, m: _mem_table(fe, m, _region(off=0x800)),
    "mem table: size 0": lambda fe, m: _mem_table(fe, m, _region(size=0)),
    "mem table: guest address wraps 2^64": lambda fe, m: _mem_table(
        fe, m, _region(gpa=(1 << 64) - 0x1000, size=0x2000)
    ),
    "mem table: user address wraps 2^64": lambda fe, m: _mem_table(
        fe, m, _region(uva=(1 << 64) - 0x1000, size=0x2000)
    ),
    "mem table: mmap offset past the memfd": lambda fe, m: _mem_table(fe, m, _region(off=64 * MiB)),
    "mem table: mmap offset near 2^64": lambda fe, m: _mem_table(
        fe, m, _region(off=(1 << 64) - 0x1000)
    ),
    "mem table: same user addresses": lambda fe, m: fe.send(
        codec.SetMemTable(
            (
                codec.MemRegion(0, MiB, 0x1000_0000, 0),
                codec.MemRegion(2 * MiB, MiB, 0x1000_0000, 0),
            ),
            (m.fds[0], m.fds[1]),
        )
    ),
    "mem table: a pipe": lambda fe, m: _send_with_pipe(fe),
    "add region overlapping": lambda fe, m: _add_overlapping(fe, m),
    "vring num 3": lambda fe, m: fe.send(codec.SetVringNum(0, 3)),
    "vring num 2^31": lambda fe, m: fe.send(codec.SetVringNum(0, 1 << 31)),
    "vring num 2^32-1": lambda fe, m: fe.send(codec.SetVringNum(1, 0xFFFF_FFFF)),
    "vring index 2^32-1": lambda fe, m: fe.send(codec.SetVringNum(0xFFFF_FFFF, 64)),
    "descriptor table in the hole": lambda fe, m: _vring_addr(
        fe, m, m.uva(MiB - 0x1000) + 0x1000, m.uva(lay.avail), m.uva(lay.used)
    ),
    "used ring past the end of memory": lambda fe, m: _vring_addr(
        fe, m, m.uva(lay.desc), m.uva(lay.avail), m.uva(4 * MiB - 0x1000) + 0xF00
    ),
    "avail ring at 2^64 - 2": lambda fe, m: _vring_addr(
        fe, m, m.uva(lay.desc), (1 << 64) - 2, m.uva(lay.used)
    ),
    "descriptor table at 0": lambda fe, m: _vring_addr(fe, m, 0, m.uva(lay.avail), m.uva(lay.used)),
    "call fd is a memfd": lambda fe, m: fe.send(codec.SetVringCall(0, m.fds[0])),
    "err fd is a memfd": lambda fe, m: fe.send(codec.SetVringErr(0, m.fds[0])),
    "GET_CONFIG past the config space": lambda fe, m: fe.send(codec.GetConfig(4000, 256)),
    "GET_VRING_BASE of queue 7": lambda fe, m: fe.send(codec.GetVringBase(7)),
}


def _add_overlapping(fe: Frontend, m: FrontendMemory) -> None:
    fe.set_mem_table(m)
    fe.send(codec.AddMemReg(codec.MemRegion(MiB // 2, MiB, 0x5000_0000, 0), m.fds[0]))


def _send_with_pipe(fe: Frontend) -> None:
    r, w = os.pipe()
    try:
        fe.send(codec.SetMemTable((codec.MemRegion(0, MiB, 0x1000_0000, 0),), (r,)))
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("case", list(EXTRA), ids=list(EXTRA))
def test_more_hostile_messages(srv: ServeProcess, case: str) -> None:
    fe, memory = connected(srv.socket)
    try:
        fe.handshake()
        EXTRA[case](fe, memory)
        assert_dropped(fe.transport.sock)
    finally:
        fe.close()
        memory.close()
    srv.wait_fds()
    assert "front-end protocol error: dropping connection" in srv.new_log()


def test_garbage_before_any_handshake(srv: ServeProcess) -> None:
    for blob in (os.urandom(4096), b"\x01\x00\x00\x00" + os.urandom(60), b"GET / HTTP/1.1\r\n\r\n"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(srv.socket)
        try:
            sock.sendall(blob)
            assert_dropped(sock)
        except (ConnectionResetError, BrokenPipeError):
            pass
        finally:
            sock.close()
        srv.wait_fds()


# -- connections that end badly ----------------------------------------------------------------


@pytest.mark.parametrize(
    "cut",
    ["4 bytes of header", "header only", "half the payload", "half a mem table with its fds"],
)
def test_closed_mid_message(srv: ServeProcess, cut: str) -> None:
    fe, memory = connected(srv.socket)
    try:
        fe.handshake()
        table = codec.serialize(codec.SetMemTable(memory.regions(), tuple(memory.fds)))
        if cut == "4 bytes of header":
            fe.send_raw(codec.serialize(codec.GetFeatures())[:4])
        elif cut == "header only":
            fe.send_raw(codec.serialize(codec.SetFeatures(0))[:12])
        elif cut == "half the payload":
            fe.send_raw(codec.serialize(codec.SetVringAddr(0, 0, 0, 0, 0, 0))[:30])
        else:
            fe.send_raw(table[: len(table) // 2], memory.fds)
    finally:
        fe.close()
        memory.close()
    srv.wait_fds()


@pytest.mark.parametrize("delay", [0.0, 0.002, 0.02])
def test_frontend_vanishes_with_requests_in_flight(srv: ServeProcess, delay: float) -> None:
    """A 1 MiB write on queue 0 and 32 small writes on queue 1, then the front-end closes the
    socket and unmaps its memory. The server finishes or drops them; every target sector ends
    old or new, nothing else changes."""
    old = bytes(srv.shadow.data)
    big_sector, big = 1024, os.urandom(MiB)
    small = {4096 + 16 * i: os.urandom(4096) for i in range(32)}
    s_cm = BlkSession.open(srv.socket, queues=(0, 1))
    s = s_cm.__enter__()
    try:
        ring0, ring1 = s.rings[0], s.rings[1]
        hdr = s.header(BIG_AREA[0], VIRTIO_BLK_T_OUT, big_sector)
        s.put(BIG_AREA[0] + 4096, big)
        ring0.add_chain(
            [(hdr, 16, False), (BIG_AREA[0] + 4096, MiB, False), (s.status_at(hdr + 16), 1, True)]
        )
        for i, (sector, data) in enumerate(small.items()):
            gpa = s.area(1) + i * 0x2000
            s.header(gpa, VIRTIO_BLK_T_OUT, sector)
            s.put(gpa + 0x800, data[:2048])
            s.put(gpa + 0x1000, data[2048:])
            ring1.add_chain(
                [
                    (gpa, 16, False),
                    (gpa + 0x800, 2048, False),
                    (gpa + 0x1000, 2048, False),
                    (s.status_at(gpa + 16), 1, True),
                ],
                publish=False,
            )
        ring1.publish()
        s.kick(0)
        s.kick(1)
        time.sleep(delay)
    finally:
        s_cm.__exit__(None, None, None)
    srv.wait_fds()
    image = srv.image.read_bytes()
    targets = {big_sector + i: big[i * SECTOR : (i + 1) * SECTOR] for i in range(MiB // SECTOR)}
    for sector, data in small.items():
        targets.update({sector + i: data[i * SECTOR : (i + 1) * SECTOR] for i in range(8)})
    for sector in range(len(image) // SECTOR):
        got = image[sector * SECTOR : (sector + 1) * SECTOR]
        before = old[sector * SECTOR : (sector + 1) * SECTOR]
        if sector in targets:
            assert got in (before, targets[sector]), f"sector {sector} is neither old nor new"
        else:
            assert got == before, f"sector {sector} changed"
    srv.shadow.write(0, image)


def test_idle_frontend_holds_the_device_but_does_not_wedge_the_server(srv: ServeProcess) -> None:
    """One front-end at a time: while one is connected (even silent), a second is turned away
    at once rather than left hanging; when the first leaves, the next is served."""
    idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    idle.connect(srv.socket)
    try:
        time.sleep(0.3)
        t0 = time.monotonic()
        second = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        second.connect(srv.socket)
        try:
            second.sendall(codec.serialize(codec.GetFeatures()))
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert_dropped(second, timeout=5.0)
        second.close()
        assert time.monotonic() - t0 < 5.0
    finally:
        idle.close()


def test_silent_frontend_is_dropped_after_the_first_message_timeout(srv: ServeProcess) -> None:
    """QEMU speaks first (GET_FEATURES) right after connecting. A peer that connects and says
    nothing must not keep the device from the next front-end forever."""
    idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    idle.connect(srv.socket)
    t0 = time.monotonic()
    try:
        assert_dropped(idle, timeout=20.0)
    finally:
        idle.close()
    assert 2.0 < time.monotonic() - t0 < 20.0
    assert "sent nothing after connecting" in srv.new_log()


def test_frontend_stalled_mid_message_is_dropped(srv: ServeProcess) -> None:
    fe, memory = connected(srv.socket)
    try:
        fe.handshake()
        t0 = time.monotonic()
        fe.send_raw(codec.serialize(codec.SetVringNum(0, 64))[:7])
        assert_dropped(fe.transport.sock, timeout=20.0)
        assert 2.0 < time.monotonic() - t0 < 20.0
    finally:
        fe.close()
        memory.close()


def test_frontend_that_never_reads_replies_is_dropped(srv: ServeProcess) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(srv.socket)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    request = codec.serialize(codec.GetFeatures()) * 256
    deadline = time.monotonic() + 30
    sock.settimeout(0.5)
    try:
        while time.monotonic() < deadline:
            try:
                sock.send(request)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        else:
            raise AssertionError("still connected after 30 s of unread replies")
    finally:
        sock.close()


def test_two_frontends_at_once(srv: ServeProcess) -> None:
    with BlkSession.open(srv.socket, queues=(0, 1)) as first:
        assert first.request(0, VIRTIO_BLK_T_IN, 0, read_len=512).ok
        for _ in range(3):
            fe2 = Frontend.connect(srv.socket, timeout=5.0)
            try:
                with pytest.raises((ConnectionClosed, FrontendProtocolError, OSError)):
                    fe2.handshake()
            finally:
                fe2.close()
        data = os.urandom(4096)
        assert first.request(1, VIRTIO_BLK_T_OUT, 300, data=data).ok
        srv.shadow.write(300 * SECTOR, data)
        got = first.request(0, VIRTIO_BLK_T_IN, 300, read_len=4096)
        assert got.ok and got.data == data


def test_sigterm_with_requests_in_flight(tmp_path_factory: pytest.TempPathFactory) -> None:
    """What a user's ^C does mid-I/O: the request in flight finishes (or was never started),
    the process exits 0, and the image has the write exactly when the guest was told so."""
    sp = ServeProcess(tmp_path_factory.mktemp("sigterm"))
    old = sp.image.read_bytes()[64 * SECTOR : 64 * SECTOR + MiB]
    try:
        with BlkSession.open(sp.socket, queues=(0,)) as s:
            data = os.urandom(MiB)
            hdr = s.header(BIG_AREA[0], VIRTIO_BLK_T_OUT, 64)
            s.put(BIG_AREA[0] + 4096, data)
            status = s.status_at(hdr + 16)
            head = s.rings[0].add_chain(
                [(hdr, 16, False), (BIG_AREA[0] + 4096, MiB, False), (status, 1, True)]
            )
            s.kick(0)
            time.sleep(0.005)
            assert sp.proc is not None
            sp.proc.send_signal(signal.SIGTERM)
            assert sp.proc.wait(20) == 0
            done = s.rings[0].used_entries()
            written = sp.image.read_bytes()[64 * SECTOR : 64 * SECTOR + MiB]
            if done:
                assert done == [(head, 1)] and s.get(status, 1)[0] == 0
                assert written == data
            else:
                assert written == old
    finally:
        sp.stop()
    assert not sp.crash_lines()


@pytest.mark.parametrize("how", ["SET_MEM_TABLE", "REM_MEM_REG"])
def test_ring_memory_pulled_from_under_running_rings(srv: ServeProcess, how: str) -> None:
    """The front-end takes away the region holding the rings while they run: they stop (no
    crash, nothing served from unmapped memory); when the region comes back they resume and
    serve what the guest queued meanwhile."""
    with BlkSession.open(srv.socket, queues=(0, 1)) as s:
        assert s.request(0, VIRTIO_BLK_T_IN, 0, read_len=512).ok
        regions = s.memory.regions()
        if how == "SET_MEM_TABLE":
            s.fe.call(codec.SetMemTable(regions[:1], (s.memory.fds[0],)))
        else:
            s.fe.rem_mem_reg(regions[1])
        ring = s.rings[1]
        hdr = s.header(s.area(1), VIRTIO_BLK_T_IN, 8)
        status = s.status_at(hdr + 16)
        head = ring.add_chain([(hdr, 16, False), (hdr + 0x100, 1024, True), (status, 1, True)])
        s.kick(1)
        s.assert_no_used(1, 0.3)
        if how == "SET_MEM_TABLE":
            s.fe.set_mem_table(s.memory)
        else:
            s.fe.add_mem_reg(regions[1], s.memory.fds[1])
        assert s.wait_used(1) == [(head, 1025)]
        assert s.get(hdr + 0x100, 1024) == bytes(srv.shadow.data[8 * SECTOR : 10 * SECTOR])
        assert s.request(0, VIRTIO_BLK_T_IN, 0, read_len=512).ok
    assert "vring cannot start" in srv.new_log()


def test_get_vring_base_returns_every_popped_chain(srv: ServeProcess) -> None:
    """QEMU stops a ring (disable, GET_VRING_BASE) with a 1 MiB write in flight: the reply
    comes once everything popped is back in the used ring, so base == used idx."""
    with BlkSession.open(srv.socket, queues=(0,)) as s:
        data = os.urandom(MiB)
        hdr = s.header(BIG_AREA[0], VIRTIO_BLK_T_OUT, 2 * 2048)
        s.put(BIG_AREA[0] + 4096, data)
        status = s.status_at(hdr + 16)
        s.rings[0].add_chain(
            [(hdr, 16, False), (BIG_AREA[0] + 4096, MiB, False), (status, 1, True)]
        )
        s.kick(0)
        s.fe.set_vring_enable(0, False)
        base = s.fe.get_vring_base(0)
        assert base == s.rings[0].used_idx
        if base:
            assert s.get(status, 1)[0] == 0
            srv.shadow.write(2 * 2048 * SECTOR, data)


def test_frontend_churns_ring_state_under_io(srv: ServeProcess) -> None:
    """While the guest streams writes on both queues, the front-end keeps disabling and
    re-enabling rings and swapping call fds (what QEMU does when the guest masks interrupts).
    Every request completes exactly once, with the right data on disk."""
    rng = random.Random(7)
    with BlkSession.open(srv.socket, queues=(0, 1)) as s:
        expected: dict[int, bytes] = {}
        outstanding: dict[int, set[int]] = {0: set(), 1: set()}
        for round_ in range(12):
            for q in (0, 1):
                ring = s.rings[q]
                for i in range(4):
                    sector = 16 * (64 * q + 4 * (round_ % 4) + i)
                    data = rng.randbytes(1024)
                    gpa = s.area(q) + 0x4000 * (i + 4 * (round_ % 2))
                    s.header(gpa, VIRTIO_BLK_T_OUT, sector)
                    s.put(gpa + 0x100, data)
                    head = ring.add_chain(
                        [
                            (gpa, 16, False),
                            (gpa + 0x100, 1024, False),
                            (s.status_at(gpa + 16), 1, True),
                        ],
                        publish=False,
                    )
                    outstanding[q].add(head)
                    expected[sector] = data
                ring.publish()
                s.kick(q)
            q = round_ % 2
            if round_ % 3 == 0:
                s.fe.set_vring_enable(q, False)
                s.fe.set_vring_enable(q, True)
            else:
                new = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                s.fe.call(codec.SetVringCall(q, new))
                os.close(s.fe.vrings[q].call)
                s.fe.vrings[q].call = new
            for q in (0, 1):
                for head, length in s.wait_used(q, len(outstanding[q])):
                    assert length == 1 and head in outstanding[q]
                    outstanding[q].remove(head)
                assert not outstanding[q]
        for sector, data in expected.items():
            got = s.request(0, VIRTIO_BLK_T_IN, sector, read_len=1024)
            assert got.ok and got.data == data
            srv.shadow.write(sector * SECTOR, data)


def _get_vring_base(s: BlkSession, *queues: int) -> None:
    for q in queues:
        s.fe.get_vring_base(q)


ODD_SEQUENCES: dict[str, Callable[[BlkSession], None]] = {
    "RESET_OWNER while running": lambda s: s.fe.send(codec.ResetOwner()),
    "GET_VRING_BASE twice": lambda s: _get_vring_base(s, 0, 0),
    "GET_VRING_BASE of a ring never set up": lambda s: _get_vring_base(s, 1),
    "enable a ring never set up": lambda s: s.fe.set_vring_enable(1, True),
    "SET_FEATURES again without EVENT_IDX": lambda s: s.fe.set_features(s.features & ~(1 << 29)),
    "SET_VRING_NUM while running": lambda s: s.fe.call(codec.SetVringNum(0, 16)),
    "SET_VRING_BASE 0xffff while running": lambda s: s.fe.call(codec.SetVringBase(0, 0xFFFF)),
    "SET_MEM_TABLE with no region": lambda s: s.fe.call(codec.SetMemTable((), ())),
    "SET_CONFIG over the whole space": lambda s: s.fe.send(codec.SetConfig(0, b"\xff" * 60)),
}


@pytest.mark.parametrize("case", list(ODD_SEQUENCES), ids=list(ODD_SEQUENCES))
def test_odd_requests_on_a_running_device(srv: ServeProcess, case: str) -> None:
    """Requests out of QEMU's usual order, on a device with a queue serving I/O: the server
    may refuse them or go along, but it lives on, and the queue still works or the front-end
    is told (dropped)."""
    with BlkSession.open(srv.socket, queues=(0,)) as s:
        hdr = s.header(BIG_AREA[0], VIRTIO_BLK_T_IN, 0)
        s.rings[0].add_chain(
            [(hdr, 16, False), (hdr + 0x1000, MiB, True), (s.status_at(hdr + 16), 1, True)]
        )
        s.kick(0)
        try:
            ODD_SEQUENCES[case](s)
            s.fe.get_features()  # still talking?
        except (ConnectionClosed, FrontendProtocolError, OSError):
            return


# -- eventfds the front-end made to block ------------------------------------------------------


def _full_blocking_eventfd() -> int:
    """A blocking eventfd whose counter is at its maximum: a write to it would block."""
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    os.eventfd_write(fd, 0xFFFF_FFFF_FFFF_FFFE)
    return fd


def _read_request(s: BlkSession, q: int) -> int:
    gpa = s.area(q)
    s.header(gpa, VIRTIO_BLK_T_IN, 8)
    return s.rings[q].add_chain(
        [(gpa, 16, False), (gpa + 0x200, SECTOR, True), (s.status_at(gpa + 0x400), 1, True)]
    )


def _used_without_interrupts(s: BlkSession, q: int) -> list[tuple[int, int]]:
    """Poll the used ring (the call fd is the test's to break, so no waiting on it)."""
    deadline = time.monotonic() + 15
    while not (used := s.rings[q].used_entries()):
        assert time.monotonic() < deadline, "request never completed"
        time.sleep(0.05)
    return used


@pytest.mark.parametrize("when", ["before the ring starts", "while the ring runs"])
def test_call_eventfd_that_would_block(srv: ServeProcess, when: str) -> None:
    """Signalling a full, blocking call fd must neither wedge the worker (then the
    connection's teardown, then the whole server) nor the connection thread."""
    bad = _full_blocking_eventfd()
    try:
        with BlkSession.open(srv.socket, queues=(0,)) as s:
            if when == "before the ring starts":
                s.fe.call(codec.SetVringEnable(0, False))
                s.fe.call(codec.SetVringCall(0, bad))
                s.fe.call(codec.SetVringEnable(0, True))
            else:
                s.fe.call(codec.SetVringCall(0, bad))  # the server signals the new fd at once
            head = _read_request(s, 0)
            s.kick(0)
            assert _used_without_interrupts(s, 0) == [(head, SECTOR + 1)]
    finally:
        os.close(bad)


def test_kick_eventfd_shared_by_two_queues_and_blocking(srv: ServeProcess) -> None:
    """Both workers may wake on one kick; the one that reads second must not block (which
    would wedge it, and the connection's teardown with it). Which queue a shared kick
    serves is the front-end's problem; once it gives each queue its own fd, both run."""
    kick = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        with BlkSession.open(srv.socket, queues=(0, 1)) as s:
            for q in (0, 1):
                s.fe.call(codec.SetVringKick(q, kick))
            for _ in range(30):
                os.eventfd_write(kick, 1)
                time.sleep(0.02)
            heads = [_read_request(s, q) for q in (0, 1)]
            for q in (0, 1):  # a restarted ring looks at its ring at once
                own = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                try:
                    s.fe.call(codec.SetVringKick(q, own))
                finally:
                    os.close(own)
            for q, head in zip((0, 1), heads, strict=True):
                assert s.wait_used(q) == [(head, SECTOR + 1)]
    finally:
        os.close(kick)


def test_frontend_trickling_one_message_is_dropped(srv: ServeProcess) -> None:
    """The message timeout bounds the whole message, not each recv: a byte every second
    must not keep the single-threaded server reading one message for hours."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(srv.socket)
    try:
        sock.sendall(_header(codec.Request.SET_FEATURES, 4096))
        t0 = time.monotonic()
        sock.settimeout(1.0)
        while time.monotonic() - t0 < 30:
            try:
                sock.send(b"\0")
                if sock.recv(4096) == b"":
                    break
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        else:
            pytest.fail("the server kept reading a trickled message for 30 s")
        assert time.monotonic() - t0 < 15
    finally:
        sock.close()
    assert "stalled in the middle of a message" in srv.new_log()


MALFORMED_WITH_NEED_REPLY = {
    "SET_VRING_NUM with 12 payload bytes": (codec.Request.SET_VRING_NUM, bytes(12)),
    "SET_FEATURES with 4 payload bytes": (codec.Request.SET_FEATURES, bytes(4)),
    "SET_VRING_ENABLE state 2": (codec.Request.SET_VRING_ENABLE, codec.VRING_STATE.pack(0, 2)),
    "SET_MEM_TABLE claiming 9 regions": (
        codec.Request.SET_MEM_TABLE,
        codec.MEMORY_TABLE_HEADER.pack(9, 0),
    ),
}


@pytest.mark.parametrize(
    "case", list(MALFORMED_WITH_NEED_REPLY), ids=list(MALFORMED_WITH_NEED_REPLY)
)
def test_malformed_payload_gets_a_failure_ack(srv: ServeProcess, case: str) -> None:
    request, payload = MALFORMED_WITH_NEED_REPLY[case]
    fe, memory = connected(srv.socket)
    try:
        fe.handshake()
        assert fe.reply_ack
        flags = codec.VERSION | codec.FLAG_NEED_REPLY
        fe.send_raw(_header(request, len(payload), flags) + payload)
        reply = fe.transport.receive_reply(request)
        assert reply == codec.U64Reply(request, 1)
        assert_dropped(fe.transport.sock)
    finally:
        fe.close()
        memory.close()


# -- buffers that cross from one region into the next --------------------------------------------

ADJACENT = (
    RegionSpec(0, MiB, 0x7F00_0000_0000),
    RegionSpec(MiB, MiB, 0x7F20_0000_0000, mmap_offset=0x3000),
    RegionSpec(2 * MiB, 2 * MiB, 0x7F10_0000_0000),
)
"""Guest RAM split into regions at guest-contiguous boundaries (QEMU does this): a buffer may
run from one into the next."""


def test_request_parts_across_adjacent_regions(srv: ServeProcess) -> None:
    edge = MiB
    with BlkSession.open(srv.socket, queues=(0,), layout=ADJACENT) as s:
        ring = s.rings[0]

        def run(bufs: list[tuple[int, int, bool]]) -> tuple[int, int]:
            head = ring.add_chain(bufs)
            s.kick(0)
            used = s.wait_used(0)
            assert [h for h, _ in used] == [head]
            return used[0][1], s.get(bufs[-1][0], 1)[0]

        s.header(edge - 8, VIRTIO_BLK_T_IN, 8)  # the header itself straddles
        data = (0x3000, SECTOR, True)
        assert run([(edge - 8, 16, False), data, (s.status_at(0x4000), 1, True)]) == (513, 0)
        assert s.get(0x3000, SECTOR) == srv.shadow.data[8 * SECTOR : 9 * SECTOR]

        s.header(0x2000, VIRTIO_BLK_T_GET_ID, 0)
        s.put(edge - 10, b"\xee" * 20)
        status = s.status_at(0x4000)
        assert run([(0x2000, 16, False), (edge - 10, 20, True), (status, 1, True)]) == (21, 0)
        assert s.get(edge - 10, 20) == SERIAL.encode().ljust(20, b"\0")

        s.header(0x2000, VIRTIO_BLK_T_WRITE_ZEROES, 0)
        s.put(edge - 8, DWZ_SEG.pack(100, 8, 0))
        status = s.status_at(0x4000)
        assert run([(0x2000, 16, False), (edge - 8, 16, False), (status, 1, True)]) == (1, 0)
        srv.shadow.write(100 * SECTOR, bytes(8 * SECTOR))


def test_faulty_chain_with_an_empty_tail_still_gets_ioerr(srv: ServeProcess) -> None:
    with BlkSession.open(srv.socket, queues=(0,)) as s:
        a = s.area(0)
        s.header(a, VIRTIO_BLK_T_IN, 0)
        status = s.status_at(a + 0x100)
        s.desc(0, 0, a, 16, NEXT, 1)
        s.desc(0, 1, status, 1, WRITE | NEXT, 2)
        s.desc(0, 2, a + 0x800, 0, WRITE, 0)  # zero length: the walker's fault
        assert s.raw(0, 0) == (0, 0)
        assert s.get(status, 1)[0] == VIRTIO_BLK_S_IOERR


def test_frontend_makes_its_call_fd_blocking_again_and_full(srv: ServeProcess) -> None:
    """O_NONBLOCK is on the file description the front-end shares: it can clear the flag
    after handing the fd over, then fill the counter. The worker's write must still not
    wedge it, the connection's teardown, or the server."""
    with BlkSession.open(srv.socket, queues=(0, 1)) as s:
        assert s.request(0, VIRTIO_BLK_T_IN, 0, read_len=SECTOR).ok
        call = s.fe.vrings[0].call
        # Fill the counter while the fd is still non-blocking, so that this test can never
        # block on it: a completion signal may already sit in the counter (then the write
        # fails with EAGAIN; drain it and try again). Only then clear O_NONBLOCK.
        for _ in range(100):
            try:
                os.eventfd_write(call, 0xFFFF_FFFF_FFFF_FFFE)
                break
            except BlockingIOError:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(call)
        else:
            raise AssertionError("could not fill the call eventfd")
        fcntl.fcntl(call, fcntl.F_SETFL, fcntl.fcntl(call, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        head = _read_request(s, 0)
        s.kick(0)
        assert _used_without_interrupts(s, 0) == [(head, SECTOR + 1)]
        assert s.request(1, VIRTIO_BLK_T_IN, 0, read_len=SECTOR).ok
        s.fe.get_features()  # the connection thread is not stuck either


def test_semaphore_kick_eventfd_is_refused(srv: ServeProcess) -> None:
    """Each read of an EFD_SEMAPHORE eventfd takes 1 off its counter, so it stays readable:
    a worker polling it would spin for as long as the front-end stays."""
    semaphore = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK | os.EFD_SEMAPHORE)
    fe, memory = connected(srv.socket)
    try:
        fe.handshake()
        assert fe.reply_ack
        fe.set_mem_table(memory)
        fe.send(codec.SetVringKick(0, semaphore, need_reply=True))
        assert fe.transport.receive_reply(codec.Request.SET_VRING_KICK) == codec.U64Reply(
            codec.Request.SET_VRING_KICK, 1
        )
        assert_dropped(fe.transport.sock)
    finally:
        fe.close()
        memory.close()
        os.close(semaphore)
    assert "EFD_SEMAPHORE" in srv.new_log()


def test_frontend_reconnecting_right_after_hanging_up_with_messages_queued(
    srv: ServeProcess,
) -> None:
    """QEMU's stop sequence sent without waiting, a hang-up, and a new connection at once:
    the old connection's last messages are served, then the newcomer (not refused as a
    second front-end)."""
    for _ in range(5):
        with BlkSession.open(srv.socket, queues=(0, 1)) as s:
            for q in (0, 1):
                _read_request(s, q)
                s.kick(q)
            for q in (0, 1):
                s.fe.send(codec.SetVringEnable(q, False))
                s.fe.send(codec.GetVringBase(q))
            s.fe.send(codec.SetMemTable(s.memory.regions(), tuple(s.memory.fds)))
        fe = Frontend.connect(srv.socket, timeout=10)
        try:
            assert fe.get_features()
        finally:
            fe.close()
        srv.wait_fds()
    assert "refusing a second front-end" not in srv.new_log()
