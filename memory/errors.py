"""The error taxonomy of the guest-memory model.

Mirrors OpenVMM: ``guestmem::GuestMemoryError`` (an access to guest physical memory failed) and
``guestmem::AccessError`` (what a reader, writer or lock over a range reports: out of range,
read only, or a wrapped memory error). Anything a guest or front-end controls surfaces as one of
these, and both derive from :class:`GuestMemoryFault`, so a layer above can catch "the guest's
or front-end's memory was bad" in one clause; a caller's own misuse (bad argument types,
impossible offsets) is ``ValueError`` or ``TypeError``.
"""

from __future__ import annotations

import enum


class GuestMemoryErrorKind(enum.StrEnum):
    """Why a guest memory operation failed."""

    INVALID_REGION = "invalid_region"
    """A region of a memory table is malformed (alignment, size, overflow, overlap)."""
    FILE_TOO_SMALL = "file_too_small"
    """``mmap_offset + memory_size`` is past the end of the region's file."""
    MAP_FAILED = "map_failed"
    """The kernel refused to map the region's fd."""
    OUT_OF_RANGE = "out_of_range"
    """The access is not wholly inside guest memory (one region for flat accesses)."""
    INVALID_GPN = "invalid_gpn"
    """A page number cannot name a 64-bit guest physical address."""
    CLOSED = "closed"
    """The memory was closed."""


class GuestMemoryFault(Exception):
    """Root of the memory errors: what the guest or front-end gave us was not usable memory."""


class GuestMemoryError(GuestMemoryFault):
    """An access to guest physical memory, or a memory table, was invalid.

    ``kind`` says why; ``gpa`` is the first failing guest physical address (None when the error
    is about a memory table as a whole); ``length`` is the access length when known.
    """

    def __init__(
        self,
        message: str,
        kind: GuestMemoryErrorKind,
        gpa: int | None = None,
        length: int | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.gpa = gpa
        self.length = length


class AccessError(GuestMemoryFault):
    """A reader, writer or lock over request buffers failed; nothing was copied."""


class OutOfRangeError(AccessError):
    """More bytes were asked for than the buffers have left."""

    def __init__(self, available: int, requested: int) -> None:
        super().__init__(f"buffer access out of range: {requested} bytes asked, {available} left")
        self.available = available
        self.requested = requested


class ReadOnlyError(AccessError):
    """A write to buffers the guest gave only for reading (a disk write request)."""

    def __init__(self) -> None:
        super().__init__("buffers are read-only")


class MemoryAccessError(AccessError):
    """A page of the buffers is not guest memory; ``error`` (also ``__cause__``) says which."""

    def __init__(self, error: GuestMemoryError) -> None:
        super().__init__(f"guest memory access failed: {error}")
        self.error = error
        self.__cause__ = error
