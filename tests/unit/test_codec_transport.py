"""vhost_user.transport over a real socketpair: framing, SCM_RIGHTS, and fd hygiene."""

from __future__ import annotations

import array
import os
import socket
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhost_user.errors import ConnectionClosed, FrontendProtocolError
from vhost_user.protocol import codec
from vhost_user.transport import Transport, close_fds


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, Transport]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    transport = Transport(b, message_timeout=0.5)
    yield a, transport
    a.close()
    transport.close()


def send(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.sendall(data)


def test_message_with_fd_arrives_with_a_new_cloexec_fd(
    pair: tuple[socket.socket, Transport],
) -> None:
    peer, transport = pair
    efd = os.eventfd(0)
    try:
        Transport(peer).send(codec.SetVringKick(2, efd))
        msg = transport.receive()
        assert isinstance(msg, codec.SetVringKick)
        assert msg.index == 2 and msg.fd is not None and msg.fd != efd
        assert not os.get_inheritable(msg.fd)
        os.eventfd_write(efd, 5)
        assert os.eventfd_read(msg.fd) == 5
        os.close(msg.fd)
    finally:
        os.close(efd)


def test_header_and_payload_split_across_writes(pair: tuple[socket.socket, Transport]) -> None:
    peer, transport = pair
    data = codec.serialize(codec.SetVringAddr(0, 0, 0x1000, 0x3000, 0x2000, 0))
    peer.sendall(data[:5])
    peer.sendall(data[5:17])
    peer.sendall(data[17:])
    assert transport.receive() == codec.SetVringAddr(0, 0, 0x1000, 0x3000, 0x2000, 0)


def test_peer_close_between_messages_is_connection_closed(
    pair: tuple[socket.socket, Transport],
) -> None:
    peer, transport = pair
    peer.close()
    with pytest.raises(ConnectionClosed):
        transport.receive()


def test_peer_close_mid_message_is_protocol_error_and_closes_fds(
    pair: tuple[socket.socket, Transport],
) -> None:
    peer, transport = pair
    before = open_fds()
    r, w = os.pipe()
    data = codec.serialize(codec.SetVringNum(0, 8))
    send(peer, data[:14], [r, w])
    os.close(r)
    os.close(w)
    peer.close()
    with pytest.raises(FrontendProtocolError, match="middle of a message"):
        transport.receive()
    assert open_fds() <= before


def test_stall_mid_message_times_out(pair: tuple[socket.socket, Transport]) -> None:
    peer, transport = pair
    peer.sendall(codec.serialize(codec.SetVringNum(0, 8))[:6])
    with pytest.raises(FrontendProtocolError, match="stalled"):
        transport.receive()


def test_oversized_payload_rejected_before_reading_it(
    pair: tuple[socket.socket, Transport],
) -> None:
    peer, transport = pair
    peer.sendall(codec.HEADER.pack(1, 1, 1 << 20))
    with pytest.raises(FrontendProtocolError, match="exceeds"):
        transport.receive()


def test_more_than_eight_fds_is_rejected_and_all_closed(
    pair: tuple[socket.socket, Transport],
) -> None:
    peer, transport = pair
    before = open_fds()
    pipes = [os.pipe() for _ in range(5)]
    fds = [fd for p in pipes for fd in p]
    send(peer, codec.HEADER.pack(9999, 1, 0), fds)
    close_fds(fds)
    with pytest.raises(FrontendProtocolError, match="control message truncated"):
        transport.receive()
    assert open_fds() == before


def test_rejected_message_closes_its_fds(pair: tuple[socket.socket, Transport]) -> None:
    peer, transport = pair
    before = open_fds()
    r, w = os.pipe()
    send(peer, codec.HEADER.pack(codec.Request.SET_FEATURES, 1, 8) + bytes(8), [r])
    os.close(r)
    with pytest.raises(FrontendProtocolError, match="carries 1 fds"):
        transport.receive()
    os.close(w)
    assert open_fds() == before


@settings(max_examples=60, deadline=None)
@given(
    request=st.integers(0, 45),
    flags=st.sampled_from([1, 1 | codec.FLAG_NEED_REPLY, 0, 5, 0xFFFFFFFF]),
    payload=st.binary(max_size=300),
    nfds=st.integers(0, 9),
    truncate=st.booleans(),
)
def test_any_bytes_any_fds_only_protocol_errors_and_no_leaks(
    request: int, flags: int, payload: bytes, nfds: int, truncate: bool
) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    transport = Transport(b, message_timeout=0.05)
    before = open_fds()
    fds = [os.eventfd(0) for _ in range(nfds)]
    data = codec.HEADER.pack(request, flags, len(payload)) + payload
    if truncate:
        data = data[: max(1, len(data) // 2)]
    send(a, data, fds)
    close_fds(fds)
    a.close()
    try:
        msg = transport.receive()
    except (FrontendProtocolError, ConnectionClosed):
        pass
    else:
        close_fds(msg.fds)
    after = open_fds()
    transport.close()
    assert after <= before


def test_peer_that_never_reads_cannot_wedge_the_sender(
    pair: tuple[socket.socket, Transport],
) -> None:
    _peer, transport = pair
    reply = codec.U64Reply(codec.Request.GET_FEATURES, 0)
    with pytest.raises(FrontendProtocolError, match="does not read"):
        for _ in range(1_000_000):
            transport.send_reply(reply)
