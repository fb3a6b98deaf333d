"""Errors of the vhost-user layer, named by whose fault they are.

- :class:`FrontendProtocolError`: the front-end (QEMU, or whatever is on the other end of the
  socket) sent something the protocol does not allow. The connection is dropped; the backend
  keeps listening for the next one.
- :class:`GuestFault`: the guest driver put something invalid in a virtqueue (a descriptor loop,
  an index past the queue size, a buffer outside guest memory). Only the request, or at worst
  the queue, fails; the process and the connection go on.
- :class:`ConnectionClosed`: the peer hung up; not an error of anyone's, just the end.

Local misuse (a caller of this package passing nonsense) raises ``ValueError``/``TypeError``.
"""

from __future__ import annotations


class VhostUserError(Exception):
    """Base class of this package's errors."""


class FrontendProtocolError(VhostUserError):
    """The front-end broke the vhost-user protocol: drop the connection, keep serving."""


class ConnectionClosed(VhostUserError):
    """The front-end closed the socket."""


class GuestFault(VhostUserError):
    """The guest put an invalid descriptor chain or ring state in guest memory."""
