"""The back-end channel: the socket the front-end hands over with SET_BACKEND_REQ_FD.

Requests on it go the other way, backend to front-end (vhost-user spec, "Back-end message
types"). The only one sent today is CONFIG_CHANGE_MSG (:meth:`BackendChannel.notify_config_change`,
e.g. after a live resize), which may come from any thread while the connection thread goes on
serving the front-end, swapping the channel for a new one or closing it.

Locking: ``_lock`` guards which channel is current and is held only for a swap, never across
I/O. ``_notify_lock`` lets one round trip run at a time, so that two notifying threads do not
read each other's replies. A reply that never comes is bounded by :data:`BACKEND_REPLY_TIMEOUT`.

fd ownership: :meth:`BackendChannel.attach` owns the fd once it returns (the connection then
keeps it, see ``vhost_user.connection``); a rejected fd is left to the caller. The channel
closes its socket when replaced and on :meth:`BackendChannel.close`.
"""

from __future__ import annotations

import socket
import threading

import structlog

from vhost_user.errors import ConnectionClosed, FrontendProtocolError
from vhost_user.protocol import codec
from vhost_user.protocol.codec import ProtocolFeature as PF
from vhost_user.transport import Transport

BACKEND_REPLY_TIMEOUT = 5.0
"""How long the front-end may take to answer (or read) a request on the back-end channel."""


def _shut_down(transport: Transport) -> None:
    """End any wait on ``transport``'s socket in another thread (before closing it)."""
    try:
        transport.sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class BackendChannel:
    """The current back-end channel of one connection, if any. :meth:`attach` and
    :meth:`close` run on the connection thread; :meth:`notify_config_change` on any."""

    def __init__(self, logger: structlog.typing.FilteringBoundLogger) -> None:
        self.log = logger
        self._transport: Transport | None = None
        self._lock = threading.Lock()
        self._notify_lock = threading.Lock()  # one config-change round trip at a time

    def attach(self, fd: int, protocol_features: int) -> None:
        """SET_BACKEND_REQ_FD: use the Unix stream socket ``fd`` from now on (owned from
        here), replacing the previous channel; a wait on the old one ends at once.
        FrontendProtocolError (``fd`` not taken) if BACKEND_REQ was not negotiated or ``fd``
        is not such a socket."""
        if not protocol_features & PF.BACKEND_REQ:
            raise FrontendProtocolError("SET_BACKEND_REQ_FD without BACKEND_REQ negotiated")
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise FrontendProtocolError(f"SET_BACKEND_REQ_FD: not a socket ({exc})") from None
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            sock.detach()
            raise FrontendProtocolError("SET_BACKEND_REQ_FD: not a Unix stream socket")
        sock.settimeout(BACKEND_REPLY_TIMEOUT)
        new = Transport(sock, message_timeout=BACKEND_REPLY_TIMEOUT)
        with self._lock:
            old, self._transport = self._transport, new
        if old is not None:
            _shut_down(old)
            old.close()

    def notify_config_change(self, protocol_features: int) -> bool:
        """Tell the front-end the config space changed (CONFIG_CHANGE_MSG). Safe from any
        thread. Returns whether the front-end took it (False when the channel or the CONFIG
        feature is missing, or it failed)."""
        # The round trip runs outside _lock, which the connection thread takes to swap or
        # close the channel: that must not wait for an answer that may never come (a
        # front-end sharing the socket's file description can even steal the answer). A swap
        # or close shuts the old socket down, which ends a wait here at once.
        with self._lock:
            transport = self._transport
            if transport is None or not protocol_features & PF.CONFIG:
                return False
        need_reply = bool(protocol_features & PF.REPLY_ACK)
        with self._notify_lock:
            try:
                transport.send(codec.ConfigChangeMsg(need_reply=need_reply))
                if not need_reply:
                    return True
                reply = transport.receive_reply(codec.BackendRequest.CONFIG_CHANGE_MSG)
            except (ConnectionClosed, FrontendProtocolError, OSError) as exc:
                # TimeoutError (an OSError) included: the front-end did not answer in time.
                self.log.warning("config change notification failed", error=str(exc))
                return False
            return isinstance(reply, codec.U64Reply) and reply.value == 0

    def close(self) -> None:
        """Close the channel (ending any wait on it). Idempotent."""
        with self._lock:
            transport, self._transport = self._transport, None
        if transport is not None:
            _shut_down(transport)
            transport.close()
