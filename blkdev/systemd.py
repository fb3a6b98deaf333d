"""systemd integration without libsystemd: socket activation and readiness notification.

Socket activation (sd_listen_fds(3)): systemd binds the ``.socket`` unit's socket, starts the
service when QEMU connects, and passes the listening socket as fd 3, with ``LISTEN_PID`` (our
pid: the variables are for us, not a child we might start) and ``LISTEN_FDS`` (how many fds,
from 3 on). :func:`listen_fds` takes them and unsets the variables, as
``sd_listen_fds(unset_environment=1)`` does, so nothing we start inherits them.

Readiness (sd_notify(3)): with ``Type=notify`` systemd waits for ``READY=1`` on the datagram
socket named by ``NOTIFY_SOCKET`` (a path, or an abstract name written with a leading ``@``)
before it counts the service as started; ``STOPPING=1`` says we are shutting down, ``STATUS=``
is the line ``systemctl status`` shows. Without ``NOTIFY_SOCKET`` :func:`notify` does nothing:
outside systemd there is no one to tell.
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Mapping, MutableMapping
from typing import Final

import structlog

log = structlog.get_logger(__name__)

LISTEN_FDS_START: Final = 3


class ActivationError(Exception):
    """The socket-activation variables are inconsistent (a misconfigured unit)."""


def listen_fds(environ: MutableMapping[str, str] | None = None) -> list[int]:
    """The fds systemd passed us (empty when not socket-activated), marked close-on-exec.
    The variables are removed from ``environ`` (default ``os.environ``) either way."""
    env = os.environ if environ is None else environ
    pid, count = env.pop("LISTEN_PID", None), env.pop("LISTEN_FDS", None)
    env.pop("LISTEN_FDNAMES", None)
    if pid is None or count is None:
        return []
    try:
        pid_value, n = int(pid), int(count)
    except ValueError:
        raise ActivationError(f"LISTEN_PID={pid!r} LISTEN_FDS={count!r} are not numbers") from None
    if pid_value != os.getpid():
        return []  # meant for the process that started us
    if not 0 <= n <= 64:
        raise ActivationError(f"LISTEN_FDS={n} is out of range")
    fds = list(range(LISTEN_FDS_START, LISTEN_FDS_START + n))
    for fd in fds:
        try:
            os.set_inheritable(fd, False)
        except OSError as exc:
            raise ActivationError(f"LISTEN_FDS={n}, but fd {fd} is not open ({exc})") from None
    return fds


def activated_listener(fd: int, socket_path: str | None) -> tuple[socket.socket, str]:
    """The passed fd as a listening Unix stream socket, and the path it is bound to. The
    path must be ``socket_path`` when one is given (``serve --socket``): the unit's
    ``ListenStream=`` and the command line must agree."""
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        raise ActivationError(f"fd {fd} passed by systemd is not a socket")
    sock = socket.socket(fileno=fd)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ActivationError(
            f"fd {fd} passed by systemd is not a Unix stream socket: use ListenStream=/path"
        )
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise ActivationError(f"fd {fd} passed by systemd is not listening (Accept=no needed)")
    bound = sock.getsockname()
    path = bound if isinstance(bound, str) else os.fsdecode(bound)
    if socket_path is not None and os.path.abspath(socket_path) != os.path.abspath(path):
        sock.detach()
        raise ActivationError(
            f"systemd passed a socket bound to {path}, but --socket is {socket_path}"
        )
    return sock, path


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to systemd; False when not run by it or the
    message could not be sent (logged: a notification is never worth failing for)."""
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET")
    if not address:
        return False
    target = "\0" + address[1:] if address.startswith("@") else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), target)
    except OSError as exc:
        log.warning("cannot notify systemd", state=state, error=str(exc))
        return False
    return True
