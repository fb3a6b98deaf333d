"""The control socket: a running backend answers JSON-line commands in QMP's spirit.

Protocol (one request per line, one reply line per request, in order)::

    -> {"execute": "query-stats"}
    <- {"return": {"queues": [...], "total": {...}}}
    -> {"execute": "resize", "arguments": {"size": 2147483648, "force": false}, "id": 7}
    <- {"return": {}, "id": 7}
    -> {"execute": "no-such-thing"}
    <- {"error": {"class": "CommandNotFound", "desc": "the command no-such-thing ..."}}

Commands: ``query-status`` (image, format, size, read-only, queues, whether a front-end is
connected, uptime), ``query-stats`` (:mod:`blkdev.stats`: per queue and the disk's total; for
a disk reached over the network, an RBD image, also ``connections``: the TCP statistics of this
process's connections to its storage, :mod:`blkdev.netstats`, or null when the kernel could not
be asked), ``resize`` (``size`` in bytes, ``force`` to allow a shrink), ``set-log-level``
(``level``: debug, info, warning, error) and ``quit`` (stop the server the way SIGTERM does; the
reply is sent first). As in QMP, an ``id`` member is echoed in the reply, and there is no greeting.
Error classes: ``GenericError`` (malformed request, bad arguments, a refused resize),
``CommandNotFound``, ``Unsupported`` (resize where nothing can resize) and ``InternalError``
(a bug of ours, logged with its traceback).

Layers, h11 style: :func:`parse_request` turns one line into a frozen command value or a
precise :class:`RequestError` and never raises (property-tested: any bytes); the
:class:`Controller` executes a command against a :class:`Backend` and encodes the reply; the
:class:`ControlServer` owns the socket and its threads and does nothing but I/O.

Entry point for ``serve``::

    backend = Backend(image=path, disk=disk, device=device,
                      connected=lambda: server.connection is not None, stop=server.stop)
    with ControlServer(control_path, backend):   # binds now (mode 0600), serves from here on
        server.serve_forever()

Socket: created mode 0600 (bound, chmod-ed, and only then listening, so nobody connects in
between). A stale socket file left by a dead process is replaced, like the vhost-user socket;
a socket someone still listens on, or a path that is not a socket, raises
:class:`FileExistsError` and nothing is touched. Clients are served one thread each, at most
:data:`MAX_CLIENTS` at a time (one more is told so and closed). What a client may not do: send
a line longer than :data:`MAX_LINE` (it gets an error reply and is dropped), leave its replies
unread for :data:`SEND_TIMEOUT` (dropped), stay silent for :data:`IDLE_TIMEOUT` (dropped).
Nothing a client sends ends the process or disturbs another client.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import structlog

from blkdev import netstats
from blkdev.errors import BlkdevError
from vhost_user.server import claim_socket_path

if TYPE_CHECKING:
    from blkdev.device import BlkDevice
    from blkdev.disks.disk import Disk

log = structlog.get_logger(__name__)

MAX_LINE: Final = 64 * 1024
"""Longest request line, newline excluded (a longer one is answered with an error, then the
client is dropped: there is no telling where its next request starts)."""
MAX_CLIENTS: Final = 16
IDLE_TIMEOUT: Final = 600.0
SEND_TIMEOUT: Final = 5.0
MAX_SIZE: Final = 2**63 - 1
"""Largest ``resize`` size: a signed 64-bit byte count, as QMP's ``size`` type and off_t."""
LOG_LEVELS: Final = ("debug", "info", "warning", "error")

GENERIC_ERROR: Final = "GenericError"
COMMAND_NOT_FOUND: Final = "CommandNotFound"
UNSUPPORTED: Final = "Unsupported"
INTERNAL_ERROR: Final = "InternalError"

# -- commands: pure values -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QueryStatus:
    pass


@dataclass(frozen=True, slots=True)
class QueryStats:
    pass


@dataclass(frozen=True, slots=True)
class Resize:
    size: int
    force: bool = False


@dataclass(frozen=True, slots=True)
class SetLogLevel:
    level: str


@dataclass(frozen=True, slots=True)
class Quit:
    pass


Command = QueryStatus | QueryStats | Resize | SetLogLevel | Quit


@dataclass(frozen=True, slots=True)
class Request:
    """A well-formed request. ``id`` is the request's ``id`` member as JSON text, to echo."""

    command: Command
    id: str | None = None


@dataclass(frozen=True, slots=True)
class RequestError:
    """Why a line is not a request: the error reply's ``class`` and ``desc``."""

    error_class: str
    desc: str
    id: str | None = None


# -- parsing: bytes -> Request | RequestError, never an exception ----------------------------


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _unexpected(members: dict[str, Any], allowed: tuple[str, ...], what: str) -> str | None:
    extra = sorted(set(members) - set(allowed))
    if not extra:
        return None
    expected = ", ".join(repr(a) for a in allowed) or "none"
    return f"{what} {extra[0]!r} is unexpected (expected: {expected})"


def _no_arguments(command: Command) -> Callable[[dict[str, Any]], Command | str]:
    def parse(arguments: dict[str, Any]) -> Command | str:
        return _unexpected(arguments, (), "parameter") or command

    return parse


def _parse_resize(arguments: dict[str, Any]) -> Command | str:
    problem = _unexpected(arguments, ("size", "force"), "parameter")
    if problem is not None:
        return problem
    if "size" not in arguments:
        return "parameter 'size' is missing"
    size = arguments["size"]
    # type() and not isinstance(): JSON true must not pass for the integer 1.
    if type(size) is not int:
        return "parameter 'size' must be an integer (bytes)"
    if not 1 <= size <= MAX_SIZE:
        return f"parameter 'size' must be between 1 and {MAX_SIZE}, not {size}"
    force = arguments.get("force", False)
    if type(force) is not bool:
        return "parameter 'force' must be true or false"
    return Resize(size, force)


def _parse_set_log_level(arguments: dict[str, Any]) -> Command | str:
    problem = _unexpected(arguments, ("level",), "parameter")
    if problem is not None:
        return problem
    level = arguments.get("level")
    if level is None:
        return "parameter 'level' is missing"
    if not isinstance(level, str) or level not in LOG_LEVELS:
        return f"parameter 'level' must be one of {', '.join(LOG_LEVELS)}"
    return SetLogLevel(level)


_PARSERS: Final[dict[str, Callable[[dict[str, Any]], Command | str]]] = {
    "query-status": _no_arguments(QueryStatus()),
    "query-stats": _no_arguments(QueryStats()),
    "resize": _parse_resize,
    "set-log-level": _parse_set_log_level,
    "quit": _no_arguments(Quit()),
}
COMMAND_NAMES: Final = tuple(_PARSERS)


def parse_request(line: bytes) -> Request | RequestError:
    """One request line (without its newline; a trailing CR is allowed) to a request, or the
    error to reply with. Never raises."""
    if len(line) > MAX_LINE:
        return RequestError(GENERIC_ERROR, f"request longer than {MAX_LINE} bytes")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return RequestError(GENERIC_ERROR, f"request is not UTF-8 (byte {exc.start})")
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:  # JSONDecodeError, NaN, an integer of more than 4300 digits
        return RequestError(GENERIC_ERROR, f"request is not JSON: {exc}")
    except RecursionError:
        return RequestError(GENERIC_ERROR, "request is not JSON: nested too deeply")
    if not isinstance(value, dict):
        return RequestError(GENERIC_ERROR, 'a request is a JSON object: {"execute": COMMAND}')
    request_id: str | None = None
    if "id" in value:
        try:
            request_id = json.dumps(value["id"], allow_nan=False)
        except (ValueError, RecursionError):
            return RequestError(GENERIC_ERROR, "member 'id' is nested too deeply")
    problem = _unexpected(value, ("execute", "arguments", "id"), "member")
    if problem is not None:
        return RequestError(GENERIC_ERROR, problem, request_id)
    name = value.get("execute")
    if name is None:
        return RequestError(GENERIC_ERROR, "member 'execute' is missing", request_id)
    if not isinstance(name, str):
        return RequestError(GENERIC_ERROR, "member 'execute' must be a string", request_id)
    parse = _PARSERS.get(name)
    if parse is None:
        known = ", ".join(COMMAND_NAMES)
        desc = f"the command {name!r} has not been found (commands: {known})"
        return RequestError(COMMAND_NOT_FOUND, desc, request_id)
    arguments = value.get("arguments", {})
    if not isinstance(arguments, dict):
        return RequestError(GENERIC_ERROR, "member 'arguments' must be a JSON object", request_id)
    command = parse(arguments)
    if isinstance(command, str):
        return RequestError(GENERIC_ERROR, f"{name}: {command}", request_id)
    return Request(command, request_id)


_COMMAND_NAME: Final[dict[type[Command], str]] = {
    QueryStatus: "query-status",
    QueryStats: "query-stats",
    Resize: "resize",
    SetLogLevel: "set-log-level",
    Quit: "quit",
}


def encode_request(command: Command) -> bytes:
    """The request line for ``command`` (the client side: ``vhost-user-blk ctl``)."""
    request: dict[str, object] = {"execute": _COMMAND_NAME[type(command)]}
    arguments = dataclasses.asdict(command)  # field names are the argument names
    if arguments:
        request["arguments"] = arguments
    return json.dumps(request).encode() + b"\n"


# -- replies -----------------------------------------------------------------------------------


def _encode(message: str, request_id: str | None) -> bytes:
    # The id is spliced in as the JSON text it was parsed from (re-encoded at parse time),
    # so encoding a reply cannot fail on it.
    if request_id is not None:
        message = f'{message[:-1]}, "id": {request_id}}}'
    return message.encode() + b"\n"


def encode_return(value: object, request_id: str | None = None) -> bytes:
    return _encode(json.dumps({"return": value}, allow_nan=False), request_id)


def encode_error(error_class: str, desc: str, request_id: str | None = None) -> bytes:
    return _encode(json.dumps({"error": {"class": error_class, "desc": desc}}), request_id)


# -- execution -------------------------------------------------------------------------------


ResizeFunction = Callable[[int, bool], None]
"""``resize(new_size, force)``: raises ``ValueError`` or a ``BlkdevError`` (``ResizeRefused``)
when it refuses, ``BlkdevError`` or ``OSError`` when it fails; the message is the reply."""


def set_structlog_level(level: str) -> None:
    """Filter structlog at ``level`` from now on (the default ``Backend.set_log_level``).

    It reconfigures the wrapper class ``configure_logging`` chose. structlog fixes the filter
    of a logger when the logger is first used (``cache_logger_on_first_use``) or bound: those
    keep the level they were made with, only later ones follow. A level every logger obeys at
    once needs ``blkdev.cli.logging_setup`` to filter against a level it can change.
    """
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(level))


@dataclass(frozen=True)
class Backend:
    """The running backend as the control socket and the metrics see it and act on it.

    ``connected`` tells whether a front-end is connected; ``stop`` asks the server to stop
    (async-signal-safe, returns at once: ``vhost_user.server.Server.stop``); ``resize`` is
    None where nothing can resize (``resize`` then replies ``Unsupported``).
    """

    image: str
    disk: Disk
    device: BlkDevice
    connected: Callable[[], bool]
    stop: Callable[[], None]
    resize: ResizeFunction | None = None
    set_log_level: Callable[[str], None] = set_structlog_level
    started: float = field(default_factory=time.monotonic)

    def status(self) -> dict[str, object]:
        return {
            "image": self.image,
            "format": self.disk.format_name,
            "size": self.disk.size,
            "read-only": self.device.read_only,
            "queues": self.device.num_queues,
            "connected": self.connected(),
            "uptime": round(time.monotonic() - self.started, 3),
        }

    def connections(self) -> list[netstats.Connection] | None:
        """The TCP connections of the disk's storage (:func:`blkdev.netstats.own_connections`;
        asked for each time, some milliseconds): [] for a disk that has none
        (``disk.network`` False), None when the kernel cannot be asked (logged)."""
        if not self.disk.network:
            return []
        try:
            return netstats.own_connections()
        except OSError as exc:
            log.warning("cannot read the TCP statistics of the disk's connections", error=str(exc))
            return None


@dataclass(frozen=True, slots=True)
class Response:
    """A reply line, and whether to stop the server once it is sent (``quit``)."""

    data: bytes
    stop: bool = False


class Controller:
    """Executes requests against a :class:`Backend`; thread-safe (one resize at a time)."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._resize_lock = threading.Lock()

    def respond(self, line: bytes) -> Response:
        """The reply to one request line. Never raises."""
        request = parse_request(line)
        if isinstance(request, RequestError):
            log.debug("bad control request", error=request.desc)
            return Response(encode_error(request.error_class, request.desc, request.id))
        try:
            return self._execute(request.command, request.id)
        except Exception as exc:
            log.exception("internal error in a control command", command=repr(request.command))
            return Response(encode_error(INTERNAL_ERROR, f"internal error: {exc}", request.id))

    def _execute(self, command: Command, request_id: str | None) -> Response:
        backend = self.backend
        if isinstance(command, QueryStatus):
            return Response(encode_return(backend.status(), request_id))
        if isinstance(command, QueryStats):
            stats = backend.device.stats.snapshot().to_json()
            if backend.disk.network:
                connections = backend.connections()
                stats["connections"] = (
                    None if connections is None else [c.to_json() for c in connections]
                )
            return Response(encode_return(stats, request_id))
        if isinstance(command, Resize):
            if backend.resize is None:
                desc = "this backend cannot resize its image"
                return Response(encode_error(UNSUPPORTED, desc, request_id))
            log.info("resize asked on the control socket", size=command.size, force=command.force)
            try:
                with self._resize_lock:
                    backend.resize(command.size, command.force)
            except (ValueError, BlkdevError, OSError) as exc:
                log.warning("resize failed", size=command.size, error=str(exc))
                return Response(encode_error(GENERIC_ERROR, f"resize: {exc}", request_id))
            return Response(encode_return({}, request_id))
        if isinstance(command, SetLogLevel):
            log.info("log level set on the control socket", level=command.level)
            backend.set_log_level(command.level)
            return Response(encode_return({}, request_id))
        log.info("quit asked on the control socket")
        return Response(encode_return({}, request_id), stop=True)


# -- the socket ------------------------------------------------------------------------------


_client_ids = itertools.count(1)


class ControlServer:
    """The control socket at ``path`` for ``backend``: bound on construction, served from
    :meth:`start` (or entering the context) until :meth:`close`. See the module docstring."""

    def __init__(
        self,
        path: str,
        backend: Backend,
        *,
        max_clients: int = MAX_CLIENTS,
        idle_timeout: float = IDLE_TIMEOUT,
        send_timeout: float = SEND_TIMEOUT,
    ) -> None:
        self.path = path
        self.controller = Controller(backend)
        self._max_clients = max_clients
        self._idle_timeout = idle_timeout
        self._send_timeout = send_timeout
        self._clients: dict[int, socket.socket] = {}
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.log = log.bind(control=path)
        claim_socket_path(path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._listener.bind(path)
            # Connecting to a socket that is bound but not listening is refused, so nobody
            # gets in before the mode is 0600.
            os.chmod(path, 0o600)
            self._inode = os.stat(path).st_ino
            self._listener.listen(8)
        except BaseException:
            self._listener.close()
            raise
        self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._acceptor = threading.Thread(
            target=self._accept_loop, name="control-accept", daemon=True
        )

    @property
    def client_count(self) -> int:
        """Clients being served now."""
        with self._lock:
            return len(self._clients)

    def start(self) -> None:
        self._acceptor.start()
        self.log.info("control socket listening")

    def close(self) -> None:
        """Stop accepting, drop every client, remove the socket file. Idempotent; bounded
        (a client thread busy in a command is waited for a few seconds at most)."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        os.eventfd_write(self._wake_fd, 1)
        if self._acceptor.ident is not None:
            self._acceptor.join(5.0)
        with self._lock:
            clients, threads = list(self._clients.values()), list(self._threads)
        for sock in clients:
            # shutdown, not close: the client's thread owns the fd and closes it; shutdown
            # wakes its recv or send. Python's socket object makes this safe against fd reuse.
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + 5.0
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._listener.close()
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        if not self._acceptor.is_alive():
            os.close(self._wake_fd)
        self.log.info("control socket closed")

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- threads ---------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        poller = select.poll()
        poller.register(self._listener.fileno(), select.POLLIN)
        poller.register(self._wake_fd, select.POLLIN)
        try:
            while not self._stopping.is_set():
                ready = {fd for fd, _ in poller.poll()}
                if self._wake_fd in ready or self._stopping.is_set():
                    return
                try:
                    sock, _ = self._listener.accept()
                except OSError as exc:
                    self.log.warning("control accept failed", error=str(exc))
                    continue
                self._admit(sock)
        except Exception:
            self.log.exception("control socket accept loop crashed")

    def _admit(self, sock: socket.socket) -> None:
        client = next(_client_ids)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            full = len(self._clients) >= self._max_clients
            if not full:
                self._clients[client] = sock
                thread = threading.Thread(
                    target=self._serve_client,
                    args=(client, sock),
                    name=f"control-client-{client}",
                    daemon=True,
                )
                self._threads.append(thread)
        if full:
            self.log.warning("too many control clients: refusing one", limit=self._max_clients)
            desc = f"too many control clients (at most {self._max_clients})"
            try:
                sock.setblocking(False)
                sock.send(encode_error(GENERIC_ERROR, desc))
            except OSError:
                pass
            sock.close()
            return
        thread.start()

    def _serve_client(self, client: int, sock: socket.socket) -> None:
        clog = self.log.bind(client=client)
        clog.debug("control client connected")
        pending = bytearray()
        try:
            while not self._stopping.is_set():
                sock.settimeout(self._idle_timeout)
                try:
                    chunk = sock.recv(MAX_LINE)
                except TimeoutError:
                    clog.info("control client idle: dropping it", idle_timeout=self._idle_timeout)
                    return
                if not chunk:
                    return
                pending += chunk
                while (end := pending.find(b"\n")) >= 0:
                    if end > MAX_LINE:
                        break
                    line = bytes(pending[:end])
                    del pending[: end + 1]
                    response = self.controller.respond(line)
                    try:
                        self._send(sock, response.data)
                    finally:
                        # A quit counts even if its asker left without reading the reply.
                        if response.stop:
                            self.controller.backend.stop()
                if len(pending) > MAX_LINE:
                    clog.warning("control request line too long: dropping the client")
                    self._send(sock, encode_error(GENERIC_ERROR, f"line longer than {MAX_LINE}"))
                    return
        except TimeoutError:
            clog.warning("control client does not read its replies: dropping it")
        except OSError as exc:
            clog.debug("control client connection failed", error=str(exc))
        except Exception:
            clog.exception("internal error serving a control client")
        finally:
            with self._lock:
                self._clients.pop(client, None)
            sock.close()
            clog.debug("control client gone")

    def _send(self, sock: socket.socket, data: bytes) -> None:
        # The timeout bounds the whole sendall (Python >= 3.5): a client that leaves its replies
        # unread cannot hold this thread longer than that.
        sock.settimeout(self._send_timeout)
        sock.sendall(data)
