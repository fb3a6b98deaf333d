"""TCP statistics of this process's connections to its storage (an RBD disk's monitors and OSDs).

:func:`own_connections` asks the kernel (sock_diag, ``INET_DIAG`` with the ``tcp_info``
extension, through pyroute2's ``DiagSocket``) for the established TCP sockets of the network
namespace, and keeps those of this process: a socket's inode is in the kernel's answer, and
``/proc/self/fd`` holds ``socket:[INODE]`` for every socket the process has open (every thread's:
they share one fd table). From ``tcp_info``: the smoothed round-trip time and its mean deviation
(``tcpi_rtt``, ``tcpi_rttvar``, microseconds), the segments retransmitted over the connection's
life (``tcpi_total_retrans``), the segments now thought lost and not yet acknowledged
(``tcpi_lost``, ``tcpi_unacked``), and the bytes acknowledged by the peer and received from it
(``tcpi_bytes_acked``, ``tcpi_bytes_received``; None where the kernel's ``tcp_info`` is too old
to have them).

Which of our connections are the disk's. The process opens TCP connections for one thing: its
storage (librados connects to the monitors and to the OSDs; vhost-user and the control socket are
Unix sockets). What else it has over TCP it *accepted*: the Prometheus metrics listener
(``blkdev.metrics``) and its scrape connections. An accepted connection has the listening
socket's local port, so the rule is: a connection whose local port is one that a listening
socket of this process listens on is not listed. An outgoing connection never has such a port:
the kernel does not pick a port bound by a listener for an outgoing connection's source port.

Cost: a socket dump of the namespace (two, IPv4 and IPv6) and a readlink per open fd, about
10 ms with a hundred sockets in the namespace; it runs only when ``query-stats`` or a scrape
asks, never per request. pyroute2 is imported then, not at start-up (its import costs a few
tenths of a second, paid by the first query).

Threads. pyroute2 (0.9) ties a socket to an event loop of the thread that made it, so each call
makes, uses and closes its own ``DiagSocket`` on the caller's thread (the control socket and the
metrics server answer on threads of their own, concurrently).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

# linux/tcp_states.h, and inet_diag's extension bit: INET_DIAG_INFO is attribute 2, asked for
# with bit (2 - 1) of ``idiag_ext``.
_TCP_ESTABLISHED: Final = 1
_TCP_LISTEN: Final = 10
_INET_DIAG_INFO_BIT: Final = 1 << (2 - 1)
_SOCKET_LINK_PREFIX: Final = "socket:["


@dataclass(frozen=True, slots=True)
class Connection:
    """One established TCP connection of this process, at the moment it was asked for."""

    remote_address: str
    remote_port: int
    local_port: int
    rtt_us: int | None
    rttvar_us: int | None
    retransmits: int | None
    lost: int | None
    unacked: int | None
    bytes_acked: int | None
    bytes_received: int | None

    @property
    def remote(self) -> str:
        """``IP:PORT`` (``[IPV6]:PORT``), the ``remote`` of query-stats and of the metrics."""
        if ":" in self.remote_address:
            return f"[{self.remote_address}]:{self.remote_port}"
        return f"{self.remote_address}:{self.remote_port}"

    def to_json(self) -> dict[str, object]:
        """The ``query-stats`` shape (keys spelled as the rest of query-stats spells them)."""
        return {
            "remote": self.remote,
            "local-port": self.local_port,
            "rtt-us": self.rtt_us,
            "rttvar-us": self.rttvar_us,
            "retransmits": self.retransmits,
            "lost": self.lost,
            "unacked": self.unacked,
            "bytes-acked": self.bytes_acked,
            "bytes-received": self.bytes_received,
        }


def own_socket_inodes() -> set[int]:
    """The inodes of every socket this process has open (``/proc/self/fd``)."""
    inodes: set[int] = set()
    fd_dir = "/proc/self/fd"
    for name in os.listdir(fd_dir):
        try:
            link = os.readlink(f"{fd_dir}/{name}")
        except OSError:
            continue  # closed meanwhile (the listdir's own fd is one of them)
        if link.startswith(_SOCKET_LINK_PREFIX) and link.endswith("]"):
            inodes.add(int(link[len(_SOCKET_LINK_PREFIX) : -1]))
    return inodes


def own_connections() -> list[Connection]:
    """This process's established TCP connections, but for accepted ones (see the module
    docstring), sorted by remote address and port. OSError when the kernel cannot be asked
    (no sock_diag, or netlink forbidden)."""
    messages = sock_diag_dump()
    # The fds after the dump: a connection made meanwhile is in neither, one closed meanwhile
    # in the dump only, and that socket's inode cannot be this process's any more.
    return select_connections(messages, own_socket_inodes())


def sock_diag_dump() -> list[Any]:
    """Every established and listening TCP socket of the network namespace, IPv4 and IPv6,
    with its ``tcp_info`` (pyroute2's ``inet_diag_msg``). OSError when the kernel cannot
    be asked."""
    from pyroute2 import DiagSocket
    from pyroute2.netlink.exceptions import NetlinkError

    states = (1 << _TCP_ESTABLISHED) | (1 << _TCP_LISTEN)
    messages: list[Any] = []
    try:
        with DiagSocket() as diag:
            diag.bind()
            for family in (socket.AF_INET, socket.AF_INET6):
                messages += diag.get_sock_stats(
                    family=family, states=states, extensions=_INET_DIAG_INFO_BIT
                )
    except NetlinkError as exc:
        raise OSError(exc.code, f"sock_diag: {exc}") from exc
    return messages


def select_connections(messages: Iterable[Any], inodes: set[int]) -> list[Connection]:
    """The connections of ``inodes`` among sock_diag ``messages`` (pyroute2's
    ``inet_diag_msg``, established and listening sockets), less those accepted by one of
    the listening sockets among them."""
    ours = [m for m in messages if int(m["idiag_inode"]) in inodes]
    listening = {int(m["idiag_sport"]) for m in ours if m["idiag_state"] == _TCP_LISTEN}
    found = [
        _connection(m)
        for m in ours
        if m["idiag_state"] == _TCP_ESTABLISHED and int(m["idiag_sport"]) not in listening
    ]
    found.sort(key=lambda c: (c.remote_address, c.remote_port, c.local_port))
    return found


def _address(text: str) -> str:
    """An IPv4-mapped IPv6 address (``::ffff:10.0.0.1``, a dual-stack socket's) as IPv4, so
    that a remote reads the same whichever kind of socket reached it."""
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def _connection(message: Any) -> Connection:
    info = message.get_attr("INET_DIAG_INFO")

    def field(name: str) -> int | None:
        # pyroute2 decodes the fields its tcp_info layout names; one the kernel's shorter
        # tcp_info did not fill is missing (or None), and so it is here. dict.get: the
        # message's own get() would look for a netlink attribute of that name first.
        if info is None:
            return None
        value = dict.get(info, name)
        return None if value is None else int(value)

    return Connection(
        remote_address=_address(str(message["idiag_dst"])),
        remote_port=int(message["idiag_dport"]),
        local_port=int(message["idiag_sport"]),
        rtt_us=field("tcpi_rtt"),
        rttvar_us=field("tcpi_rttvar"),
        retransmits=field("tcpi_total_retrans"),
        lost=field("tcpi_lost"),
        unacked=field("tcpi_unacked"),
        bytes_acked=field("tcpi_bytes_acked"),
        bytes_received=field("tcpi_bytes_received"),
    )
