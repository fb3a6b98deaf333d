"""Guest-memory model: a Python port of OpenVMM's ``guestmem`` and ``scsi_buffers`` crates.

``GuestMemory`` maps the regions a vhost-user front-end hands over (flat ``read_at``/``write_at``,
little-endian ``read_u16``.. ``write_u64`` for rings, ``view`` for long-lived ring views,
``translate_uva`` for vring addresses). ``memory.shared`` is the one way to touch a field
another agent reads or writes concurrently (ring indices): one aligned access each, and the
fences. A descriptor chain's buffers become a ``PagedRange`` (``paged_range_from_buffers``);
``RequestBuffers`` ties that to the memory and a direction (``MultiRequestBuffers`` when the
chain needs several ranges; ``request_buffers_from_buffers`` picks, ``IoBuffers`` covers both).
Disks move data through readers/writers, locked iovecs (zero copy) or a ``BounceBuffer``.

Errors: ``GuestMemoryError`` (with ``kind``, ``gpa``) from ``GuestMemory``; ``AccessError``
(``OutOfRangeError``, ``ReadOnlyError``, ``MemoryAccessError``) from buffers. Nothing a guest
or front-end controls raises anything else.
"""

from memory.bounce import BounceBuffer
from memory.errors import (
    AccessError,
    GuestMemoryError,
    GuestMemoryErrorKind,
    GuestMemoryFault,
    MemoryAccessError,
    OutOfRangeError,
    ReadOnlyError,
)
from memory.guest_memory import PAGE_SIZE, GuestMemory, MemoryRegion
from memory.paged_range import (
    AddressRange,
    PagedRange,
    paged_range_from_buffers,
    paged_ranges_from_buffers,
)
from memory.request_buffers import (
    IoBuffers,
    LockedIoBuffers,
    MemoryReader,
    MemoryWriter,
    MultiRequestBuffers,
    RequestBuffers,
    request_buffers_from_buffers,
)

__all__ = [
    "PAGE_SIZE",
    "AccessError",
    "AddressRange",
    "BounceBuffer",
    "GuestMemory",
    "GuestMemoryError",
    "GuestMemoryErrorKind",
    "GuestMemoryFault",
    "IoBuffers",
    "LockedIoBuffers",
    "MemoryAccessError",
    "MemoryReader",
    "MemoryRegion",
    "MemoryWriter",
    "MultiRequestBuffers",
    "OutOfRangeError",
    "PagedRange",
    "ReadOnlyError",
    "RequestBuffers",
    "paged_range_from_buffers",
    "paged_ranges_from_buffers",
    "request_buffers_from_buffers",
]
