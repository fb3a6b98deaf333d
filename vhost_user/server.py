"""Listen on a Unix socket and serve one vhost-user front-end at a time.

API for the CLI::

    server = Server(socket_path, device)   # binds and listens now (OSError if it cannot)
    signal handler:  server.stop()         # async-signal-safe, thread-safe, idempotent
    server.serve_forever()                 # returns after stop(): in-flight requests done,
                                           # device quiesced, socket file removed
    server.notify_config_change()          # after a live resize (any thread)

or ``serve(socket_path, device_or_factory, stop=event_or_fd)`` for the same in one call.

``device`` is either a :class:`~vhost_user.device.VhostUserDevice`, reused by every connection
in turn (each front-end negotiates features afresh), or a zero-argument factory called once
per accepted connection.

Socket file: a stale socket left by a dead process is replaced; a socket someone still listens
on, or a path that is not a socket, raises :class:`FileExistsError` and nothing is touched. A
listening socket handed over (``listener=``, systemd socket activation) is used as it is, and
its file is left in place on close: it belongs to whoever bound it. ``socket_mode`` and
``socket_group`` set the file's mode and group (for QEMU running as another user) before
anyone can connect.

One front-end at a time: while a connection runs, another that connects is accepted and closed
at once (logged), because two front-ends driving one disk would corrupt it. So that a peer
cannot hold that slot by connecting and saying nothing, a front-end that sends no message
within ``message_timeout`` of connecting is dropped (QEMU speaks first, at once). A front-end that
breaks the protocol is dropped with a warning and the server keeps listening; so is one that
triggers a bug of ours (logged with its traceback). Nothing a front-end sends ends the process.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import stat
import threading
import time
from collections.abc import Callable

import structlog

from vhost_user.connection import Connection
from vhost_user.device import VhostUserDevice
from vhost_user.errors import ConnectionClosed, FrontendProtocolError

log = structlog.get_logger(__name__)

DeviceSource = VhostUserDevice | Callable[[], VhostUserDevice]
_EVENT_POLL_MS = 200


def claim_socket_path(path: str) -> None:
    """Make ``path`` free for bind: remove a socket file nobody listens on any more (connecting
    is refused). Anything else there raises FileExistsError and is left alone: a socket
    someone listens on (EADDRINUSE), a file that is not a socket (EEXIST)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("removing stale socket", socket=path)
        os.unlink(path)
        return
    except TimeoutError:
        pass  # a listener with a full backlog is still a listener
    finally:
        probe.close()
    raise FileExistsError(errno.EADDRINUSE, "another process is listening on this socket", path)


def _peer_hung_up(fd: int) -> bool:
    """Whether the peer of socket ``fd`` has shut down its sending side (all it sent is
    already queued here, so reading the rest cannot block)."""
    poller = select.poll()
    poller.register(fd, select.POLLRDHUP)
    return any(ev & (select.POLLRDHUP | select.POLLHUP) for _fd, ev in poller.poll(0))


class Server:
    """A listening vhost-user socket; see the module docstring."""

    def __init__(
        self,
        socket_path: str,
        device: DeviceSource,
        *,
        message_timeout: float | None = 5.0,
        listener: socket.socket | None = None,
        socket_mode: int | None = None,
        socket_group: int | None = None,
    ) -> None:
        self.socket_path = socket_path
        self._device = device
        self._message_timeout = message_timeout
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._stopping = threading.Event()
        self._connection: Connection | None = None
        self._lock = threading.Lock()
        self.log = log.bind(socket=socket_path)
        if listener is not None:
            # Socket activation: whoever bound it (systemd) owns the path, which we then
            # neither replace nor remove.
            self._listener = listener
            self._inode = -1
            return
        claim_socket_path(socket_path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(socket_path)
            # Ownership and mode before listen(): connecting to a socket that is bound but
            # not listening is refused, so no one gets in under the wrong permissions.
            if socket_group is not None:
                os.chown(socket_path, -1, socket_group)
            if socket_mode is not None:
                os.chmod(socket_path, socket_mode)
            self._inode = os.stat(socket_path).st_ino
            self._listener.listen(4)
        except BaseException:
            self._listener.close()
            os.close(self._stop_fd)
            raise

    # -- control -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask :meth:`serve_forever` to finish. Safe from a signal handler and any thread."""
        self._stopping.set()
        os.eventfd_write(self._stop_fd, 1)

    @property
    def connection(self) -> Connection | None:
        """The front-end being served, if any."""
        return self._connection

    def notify_config_change(self) -> bool:
        """Forward a config-space change to the current front-end (False if none took it)."""
        with self._lock:
            conn = self._connection
        # Not under the lock: the round trip may take the backend channel's whole timeout,
        # and accepting or ending a connection must not wait for it.
        return conn.notify_config_change() if conn is not None else False

    def _make_device(self) -> VhostUserDevice:
        device = self._device
        if hasattr(device, "handle_chain"):
            return device  # type: ignore[return-value]
        assert callable(device)
        made: VhostUserDevice = device()
        return made

    # -- the loop ------------------------------------------------------------------------------

    def serve_forever(self, stop: threading.Event | int | None = None) -> None:
        """Accept and serve front-ends until :meth:`stop` (or ``stop`` is set / readable).

        On return the last connection has been closed (in-flight requests finished, device
        quiesced) and the socket file removed.
        """
        poller = select.poll()
        listen_fd = self._listener.fileno()
        poller.register(listen_fd, select.POLLIN)
        poller.register(self._stop_fd, select.POLLIN)
        if isinstance(stop, int):
            poller.register(stop, select.POLLIN)
        timeout = _EVENT_POLL_MS if isinstance(stop, threading.Event) else None
        conn_fd = -1
        # A new front-end must start talking within message_timeout. QEMU sends GET_FEATURES
        # as soon as it connects; a peer that connects and stays silent would otherwise hold
        # the one front-end slot forever, and every later front-end would be refused.
        first_deadline: float | None = None
        self.log.info("listening")
        try:
            while True:
                if self._stopping.is_set() or (isinstance(stop, threading.Event) and stop.is_set()):
                    break
                wait = timeout
                if first_deadline is not None:
                    left = max(0, int((first_deadline - time.monotonic()) * 1000) + 1)
                    wait = left if wait is None else min(wait, left)
                events = poller.poll(wait)
                if any(fd in (self._stop_fd, stop) for fd, _ in events):
                    break
                ready = {fd for fd, _ev in events}
                # The current connection first: if it has just hung up, a front-end that is
                # reconnecting gets served instead of refused.
                if conn_fd in ready:
                    first_deadline = None
                    if not self._serve_one():
                        poller.unregister(conn_fd)
                        conn_fd = -1
                        self._end_connection()
                elif first_deadline is not None and time.monotonic() >= first_deadline:
                    self.log.warning("front-end sent nothing after connecting: dropping it")
                    first_deadline = None
                    poller.unregister(conn_fd)
                    conn_fd = -1
                    self._end_connection()
                if listen_fd in ready and conn_fd >= 0 and _peer_hung_up(conn_fd):
                    # The front-end hung up with messages still queued, and someone (QEMU
                    # restarting, most likely) connects: finish the old connection first, or
                    # the newcomer would be refused as a second front-end.
                    first_deadline = None
                    while not self._stopping.is_set() and self._serve_one():
                        pass
                    poller.unregister(conn_fd)
                    conn_fd = -1
                    self._end_connection()
                if listen_fd in ready and self._accept():
                    assert self._connection is not None
                    conn_fd = self._connection.fileno()
                    poller.register(conn_fd, select.POLLIN)
                    if self._message_timeout is not None:
                        first_deadline = time.monotonic() + self._message_timeout
        finally:
            self._end_connection()
            self.close()
        self.log.info("server stopped")

    def _accept(self) -> bool:
        try:
            sock, _ = self._listener.accept()
        except OSError as exc:
            self.log.warning("accept failed", error=str(exc))
            return False
        if self._connection is not None:
            self.log.warning(
                "refusing a second front-end: one is already connected",
                connected=self._connection.id,
            )
            sock.close()
            return False
        try:
            conn = Connection(sock, self._make_device(), message_timeout=self._message_timeout)
        except Exception:
            self.log.exception("cannot set up a connection")
            sock.close()
            return False
        with self._lock:
            self._connection = conn
        conn.log.info("front-end connected")
        return True

    def _serve_one(self) -> bool:
        """Handle one message of the current connection; False when it has ended."""
        conn = self._connection
        assert conn is not None
        try:
            conn.handle_message()
        except ConnectionClosed:
            conn.log.info("front-end disconnected")
            return False
        except FrontendProtocolError as exc:
            conn.log.warning("front-end protocol error: dropping connection", error=str(exc))
            return False
        except Exception:
            conn.log.exception("internal error: dropping connection")
            return False
        return True

    def _end_connection(self) -> None:
        with self._lock:
            conn, self._connection = self._connection, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                conn.log.exception("internal error while closing the connection")

    def close(self) -> None:
        """Stop listening and remove the socket file (if it is still ours). Idempotent."""
        if self._listener.fileno() < 0:
            return
        self._listener.close()
        try:
            if os.stat(self.socket_path).st_ino == self._inode:
                os.unlink(self.socket_path)
        except FileNotFoundError:
            pass

    def __del__(self) -> None:
        # Closed only here, never in close(): stop() may run from a signal handler or another
        # thread at any time, and must never write into an fd number the kernel reused.
        fd, self._stop_fd = getattr(self, "_stop_fd", -1), -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self._end_connection()
        self.close()


def serve(
    socket_path: str,
    device_factory: DeviceSource,
    *,
    stop: threading.Event | int | None = None,
    message_timeout: float | None = 5.0,
) -> None:
    """Bind ``socket_path`` and serve until ``stop`` is set (an Event) or readable (an fd)."""
    server = Server(socket_path, device_factory, message_timeout=message_timeout)
    server.serve_forever(stop)
