"""vhost-user framing over a Unix stream socket, fds in SCM_RIGHTS ancillary data.

:class:`Transport` reads exactly one header, then exactly its payload, collecting any fds that
arrive with those bytes (received with MSG_CMSG_CLOEXEC so they never leak into a child
process), and writes messages with their fds attached to the first byte.

fd ownership: every fd received belongs to the transport until :meth:`Transport.receive`
returns a message; from then on it belongs to the message's holder. If anything about the
message is wrong (truncated control data, too many fds, a malformed payload, the peer gone
mid-message) the transport closes all fds of that message before raising, exactly once. Fds
passed to :meth:`Transport.send` stay the caller's (the kernel duplicates them into the peer).
"""

from __future__ import annotations

import array
import os
import socket
import time
from collections.abc import Callable, Sequence

from vhost_user.errors import ConnectionClosed, FrontendProtocolError
from vhost_user.protocol import codec

_FD_SIZE = array.array("i").itemsize
_ANCILLARY_SPACE = socket.CMSG_SPACE(codec.MAX_FDS * _FD_SIZE)


def close_fds(fds: Sequence[int]) -> None:
    """Close each fd once, ignoring EBADF-style errors (used only on fds we own)."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _fds_from_ancillary(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % _FD_SIZE
            fds.extend(array.array("i", data[:usable]))
    return fds


class Transport:
    """One end of a vhost-user socket. Not thread-safe: one reader, one writer at a time."""

    def __init__(self, sock: socket.socket, *, message_timeout: float | None = 5.0) -> None:
        """``message_timeout`` bounds how long the rest of a message may take once its first
        byte arrived, so a peer that stops mid-message cannot wedge the caller."""
        self.sock = sock
        self.message_timeout = message_timeout
        self._deadline: float | None = None

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    # -- receiving -----------------------------------------------------------------------------

    def _recv_exact(self, n: int, fds: list[int], *, first: bool) -> bytes:
        chunks: list[bytes] = []
        got = 0
        while got < n:
            if self._deadline is not None:
                # One deadline for the whole message, not a timeout per recv: a peer that
                # trickles a byte every few seconds must not hold the caller for hours.
                remaining = self._deadline - time.monotonic()
                if remaining <= 0:
                    raise FrontendProtocolError("front-end stalled in the middle of a message")
                self.sock.settimeout(remaining)
            try:
                data, ancdata, msg_flags, _addr = self.sock.recvmsg(
                    n - got, _ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC
                )
            except TimeoutError:
                if first and got == 0:
                    raise FrontendProtocolError(
                        f"peer sent no message within {self.sock.gettimeout()} s"
                    ) from None
                raise FrontendProtocolError(
                    "front-end stalled in the middle of a message"
                ) from None
            except (ConnectionResetError, BrokenPipeError):
                if first and got == 0:
                    raise ConnectionClosed("connection reset") from None
                raise FrontendProtocolError("connection reset in the middle of a message") from None
            fds.extend(_fds_from_ancillary(ancdata))
            if msg_flags & socket.MSG_CTRUNC:
                raise FrontendProtocolError("control message truncated (too many fds)")
            if len(fds) > codec.MAX_FDS:
                raise FrontendProtocolError(
                    f"{len(fds)} fds attached, at most {codec.MAX_FDS} allowed"
                )
            if not data:
                if first and got == 0:
                    raise ConnectionClosed("front-end closed the connection")
                raise FrontendProtocolError("connection closed in the middle of a message")
            if first and got == 0 and self.message_timeout is not None:
                self._deadline = time.monotonic() + self.message_timeout
            chunks.append(data)
            got += len(data)
        return b"".join(chunks)

    def receive_raw(self) -> tuple[codec.Header, bytes, tuple[int, ...]]:
        """One framed message: checked header, payload, fds (now the caller's)."""
        fds: list[int] = []
        timeout = self.sock.gettimeout()
        try:
            header = codec.parse_header(self._recv_exact(codec.HEADER.size, fds, first=True))
            payload = self._recv_exact(header.size, fds, first=False) if header.size else b""
        except BaseException:
            close_fds(fds)
            raise
        finally:
            self._deadline = None
            self.sock.settimeout(timeout)
        return header, payload, tuple(fds)

    def receive(
        self,
        parse: Callable[[codec.Header, bytes, tuple[int, ...]], codec.Message] = (
            codec.parse_request
        ),
    ) -> codec.Message:
        """Receive and parse one request (fds closed if it is rejected)."""
        header, payload, fds = self.receive_raw()
        try:
            return parse(header, payload, fds)
        except BaseException:
            close_fds(fds)
            raise

    def receive_reply(self, request: int) -> codec.Reply:
        """Receive and parse the reply to ``request`` (fds closed if it is rejected)."""
        header, payload, fds = self.receive_raw()
        try:
            return codec.parse_reply(request, header, payload, fds)
        except BaseException:
            close_fds(fds)
            raise

    # -- sending -------------------------------------------------------------------------------

    def send_bytes(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send one serialized message, ``fds`` attached to its first byte.

        Bounded by ``message_timeout`` too: a peer that never reads its replies fills the
        socket buffer, and must not wedge the sender."""
        timeout = self.sock.gettimeout()
        self.sock.settimeout(self.message_timeout)
        try:
            if fds:
                ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                sent = self.sock.sendmsg([data], ancillary)
            else:
                sent = self.sock.send(data)
            if sent < len(data):
                self.sock.sendall(data[sent:])
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise ConnectionClosed(f"peer gone while sending: {exc}") from None
        except TimeoutError:
            raise FrontendProtocolError("peer does not read what is sent to it") from None
        finally:
            self.sock.settimeout(timeout)

    def send(self, msg: codec.Message) -> None:
        self.send_bytes(codec.serialize(msg), msg.fds)

    def send_reply(self, reply: codec.Reply) -> None:
        fds = (reply.fd,) if isinstance(reply, codec.InflightReply) else ()
        self.send_bytes(codec.serialize_reply(reply), fds)
