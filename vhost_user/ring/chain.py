"""A descriptor chain as the split-virtqueue walker hands it to a device.

These frozen types are the contract between the ring code (``vhost_user.ring.split``, later a C
twin) and device code (``blkdev``): devices never look at ring memory, only at chains.
"""

from __future__ import annotations

from dataclasses import dataclass

from vhost_user.errors import GuestFault


@dataclass(frozen=True, slots=True)
class Descriptor:
    """One buffer of a chain, indirect tables already flattened.

    ``gpa`` is a guest physical address; ``device_writable`` is VIRTQ_DESC_F_WRITE (the device
    may write the buffer: it carries data *to* the driver).
    """

    gpa: int
    length: int
    device_writable: bool


@dataclass(frozen=True, slots=True)
class DescriptorChain:
    """An available chain, identified by its head index (what goes back in the used ring).

    ``fault`` is None for a well-formed chain. Otherwise it says what the guest did wrong, and:

    - ``complete`` is True when the chain's structure was walked to its end and only a buffer
      was bad (outside guest memory, zero-length where not allowed, a readable descriptor after a
      writable one...). ``descriptors`` then holds every descriptor, so a device may still
      report an error status in the last descriptor if that one is valid.
    - ``complete`` is False when the structure itself was broken (loop, index past the queue
      size, malformed indirect table, chain longer than the queue). ``descriptors`` then holds
      only what was walked before the fault; nothing is reachable reliably.

    Either way the device must return the head to the used ring (length 0) so the guest does not
    wait forever, and the queue keeps going.

    ``resubmitted``: the chain is one a backend that died left in flight (``ring.inflight``),
    served again after a restart.
    """

    head: int
    descriptors: tuple[Descriptor, ...]
    fault: GuestFault | None = None
    complete: bool = True
    resubmitted: bool = False
