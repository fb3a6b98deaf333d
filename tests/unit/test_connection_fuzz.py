"""Property test: whatever sequence of framed messages a front-end sends (right codes, wrong
sizes, random fds), the connection only ever ends by hang-up or FrontendProtocolError, never
leaks an fd, and always releases its memory and threads."""

from __future__ import annotations

import os
import socket
import struct
import threading

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.protocol.echo_device import EchoDevice
from tests.protocol.frontend import (
    BUFFERS_GPA,
    DEFAULT_LAYOUT,
    FrontendMemory,
    make_driver,
    ring_layout,
)
from vhost_user.connection import Connection
from vhost_user.errors import ConnectionClosed
from vhost_user.protocol import codec
from vhost_user.transport import Transport


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def payloads(memory_uvas: list[int]) -> st.SearchStrategy[bytes]:
    small = st.sampled_from([0, 1, 2, 3, 8, 64, 256, 512, 0x100, 0x101, 0xFFFF, 1 << 30])
    addr = st.sampled_from([*memory_uvas, *(u + 0x10000 for u in memory_uvas), 0, 7])
    region = st.tuples(
        st.sampled_from([0, 0x100000, 0x200000, 0x800000]),
        st.sampled_from([0x1000, 0x100000, 0x200000, 0x10000000]),
        addr,
        st.sampled_from([0, 0x1000, 0x10000]),
    ).map(lambda r: codec.MEMORY_REGION.pack(*r))
    return st.one_of(
        st.binary(max_size=48),
        small.map(codec.U64.pack),
        st.tuples(st.integers(0, 3), small).map(lambda t: codec.VRING_STATE.pack(*t)),
        st.tuples(st.integers(0, 3), st.integers(0, 1), addr, addr, addr, st.just(0)).map(
            lambda t: codec.VRING_ADDR.pack(*t)
        ),
        st.lists(region, max_size=3).map(
            lambda rs: codec.MEMORY_TABLE_HEADER.pack(len(rs), 0) + b"".join(rs)
        ),
        region.map(lambda r: bytes(8) + r),
        st.tuples(small, st.integers(0, 16)).map(
            lambda t: codec.CONFIG_HEADER.pack(t[0], t[1], 0) + bytes(t[1])
        ),
    )


UVAS = [spec.userspace_addr for spec in DEFAULT_LAYOUT]
frames = st.tuples(
    st.one_of(st.sampled_from(list(codec.Request)), st.integers(0, 64)),
    st.sampled_from([codec.VERSION, codec.VERSION | codec.FLAG_NEED_REPLY]),
    payloads(UVAS),
    st.lists(st.sampled_from(["eventfd", "memfd", "pipe"]), max_size=3),
)


@settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(frames, min_size=1, max_size=12), st.booleans())
def test_any_message_sequence_ends_cleanly(
    sequence: list[tuple[int, int, bytes, list[str]]], handshake: bool
) -> None:
    before = open_fds()
    memory = FrontendMemory()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    device = EchoDevice()
    conn = Connection(theirs, device, message_timeout=0.5)
    raised: list[BaseException] = []

    def run() -> None:
        try:
            conn.run()
        except BaseException as exc:  # pragma: no cover - the failure being tested for
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    fe = Transport(ours)
    try:
        if handshake:
            # A running ring with a request in it, so random messages hit live workers too.
            fe.send(codec.SetProtocolFeatures(int(codec.ProtocolFeature.REPLY_ACK)))
            fe.send(codec.SetFeatures(device.features | codec.VHOST_USER_F_PROTOCOL_FEATURES))
            fe.send(codec.SetMemTable(memory.regions(), tuple(memory.fds)))
            lay = ring_layout(0)
            driver = make_driver(memory.mem, lay, event_idx=True)
            fe.send(codec.SetVringNum(0, lay.size))
            fe.send(
                codec.SetVringAddr(
                    0, 0, memory.uva(lay.desc), memory.uva(lay.used), memory.uva(lay.avail), 0
                )
            )
            kick, call = os.eventfd(0), os.eventfd(0, os.EFD_NONBLOCK)
            fe.send(codec.SetVringKick(0, kick))
            fe.send(codec.SetVringCall(0, call))
            fe.send(codec.SetVringEnable(0, True))
            memory.mem.write_at(BUFFERS_GPA, b"fuzz")
            driver.add([(BUFFERS_GPA, 4, False), (BUFFERS_GPA + 0x100, 16, True)])
            os.eventfd_write(kick, 1)
            os.close(kick)
            os.close(call)
        for request, flags, payload, kinds in sequence:
            fds: list[int] = []
            for kind in kinds:
                if kind == "eventfd":
                    fds.append(os.eventfd(0))
                elif kind == "memfd":
                    fd = os.memfd_create("fuzz")
                    os.ftruncate(fd, 0x200000)
                    fds.append(fd)
                else:
                    r, w = os.pipe()
                    os.close(w)
                    fds.append(r)
            data = struct.pack("<III", request, flags, len(payload)) + payload
            try:
                fe.send_bytes(data, fds)
            except (OSError, ConnectionClosed):
                break  # the backend dropped us: that is one of the allowed endings
            finally:
                for fd in fds:
                    os.close(fd)
    finally:
        fe.close()
        thread.join(10)
        memory.close()
    assert not thread.is_alive()
    assert raised == []
    assert conn.memory is None
    assert all(r.worker is None for r in conn.rings)
    assert open_fds() <= before
