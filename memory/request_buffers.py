"""Guest buffers of one storage request: OpenVMM's ``scsi_buffers`` crate.

``RequestBuffers`` ties a ``PagedRange`` to a ``GuestMemory`` and a direction, like OpenVMM's
type of the same name. ``is_write`` means the *guest's memory* may be written (a disk read); a
read-only request hands out a writer of length 0 that refuses every write, as OpenVMM's
``PermissionedMemoryWriter`` does.

Beyond OpenVMM (whose docs list a multi-range disk API as "not currently available"):
``MultiRequestBuffers`` is the same API over several ``PagedRange``s, for descriptor chains whose
interior boundaries are neither contiguous nor page-aligned. Locking it still yields one
iovec per guest-contiguous run, so such a request is one ``preadv``/``pwritev`` with no copy;
``is_aligned`` checks every part, so a disk bounces only when O_DIRECT really requires it.
``request_buffers_from_buffers`` picks the type. ``IoBuffers`` is the protocol disks code against.

Resolution. The first access resolves the whole request against the memory once
(``GuestMemory.resolve``, a ``HostRange``); every later reader, writer or lock access slices
that. Construction touches no memory, and a request that is not wholly guest memory keeps the
exact per-access behaviour: each access then resolves only its own bytes, so it succeeds where
those are mapped and otherwise fails at its first byte that is not. Either way an access
resolves all of its pages before copying a byte: a failed read, write or lock copies nothing
and moves no cursor. This module never touches a mapping itself: the byte moves, and their
reports to the write choke point (``memory.write_tracker``), are ``HostRange``'s.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from types import TracebackType
from typing import Final, Literal, Protocol, runtime_checkable

from memory.errors import (
    AccessError,
    GuestMemoryError,
    MemoryAccessError,
    OutOfRangeError,
    ReadOnlyError,
)
from memory.guest_memory import PAGE_SIZE, GuestMemory, HostRange
from memory.paged_range import PagedRange, paged_range_from_buffers, paged_ranges_from_buffers

_FILL_CHUNK: Final = 64 * 1024
_ZEROS: Final = bytes(_FILL_CHUNK)

Buffer = bytes | bytearray | memoryview


class LockedIoBuffers:
    """Guest memory of a request, pinned as memoryviews for vectored I/O.

    ``io_vecs()`` returns one memoryview per guest-contiguous run within a region, aliasing
    guest memory (read-only views when locked for reading guest memory). The regions stay
    mapped while this object holds them, even across ``GuestMemory.close()``; leaving the
    ``with`` block (or ``release()``) releases the views.

    ``written`` (locks for writing guest memory) is the ``HostRange`` the views cover: release
    reports it to the write choke point, after the I/O that wrote it (memory.write_tracker).
    """

    __slots__ = ("_views", "_written")

    def __init__(self, views: list[memoryview], written: HostRange | None = None) -> None:
        self._views: list[memoryview] | None = views
        self._written = written

    def io_vecs(self) -> list[memoryview]:
        if self._views is None:
            raise ValueError("locked buffers were released")
        return list(self._views)

    def release(self) -> None:
        views, self._views = self._views, None
        written, self._written = self._written, None
        for v in views or ():
            try:
                v.release()
            except BufferError:
                # Still exported (e.g. a caller kept a derived buffer); the view, and the
                # mapping under it, then live until that goes away.
                pass
        if written is not None and written.writes.active:
            written.note_written()

    def __enter__(self) -> LockedIoBuffers:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _check_length(n: int) -> None:
    if n < 0:
        raise ValueError(f"negative length {n}")


def _check_alignment(alignment: int) -> int:
    if alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"alignment {alignment} is not a power of two")
    return alignment - 1


class _Buffers:
    """What both request buffer types share: memory, direction, length, the resolution."""

    __slots__ = ("_host", "_is_write", "_len", "_mem")

    _mem: GuestMemory
    _is_write: bool
    _len: int
    # None until the first access; False when the request is not wholly guest memory.
    _host: HostRange | Literal[False] | None

    def _pieces(self, pos: int, n: int) -> list[tuple[int, int]]:
        """Guest-contiguous ``(gpa, length)`` pieces of bytes ``[pos, pos+n)``, n > 0."""
        raise NotImplementedError

    def _all_pieces(self) -> list[tuple[int, int]]:
        """``_pieces`` of every byte (the request is not empty)."""
        return self._pieces(0, self._len)

    def _resolve(self) -> HostRange | Literal[False]:
        """The whole request resolved (cached), or False if it is not all guest memory."""
        host: HostRange | Literal[False]
        try:
            host = self._mem.resolve(self._all_pieces())
        except GuestMemoryError:
            host = False
        self._host = host
        return host

    def _at(self, pos: int, n: int) -> tuple[HostRange, int]:
        """A HostRange holding bytes ``[pos, pos+n)`` (n > 0) and where they start in it;
        raises MemoryAccessError at the first of those bytes that is not guest memory."""
        host = self._host
        if host is None:
            host = self._resolve()
        if host is not False:
            return host, pos
        try:
            return self._mem.resolve(self._pieces(pos, n)), 0
        except GuestMemoryError as exc:
            raise MemoryAccessError(exc) from exc

    @property
    def guest_memory(self) -> GuestMemory:
        return self._mem

    @property
    def is_write(self) -> bool:
        return self._is_write

    def __len__(self) -> int:
        return self._len

    def is_empty(self) -> bool:
        return self._len == 0

    def reader(self) -> MemoryReader:
        return MemoryReader(self)

    def writer(self) -> MemoryWriter:
        return MemoryWriter(self)

    def lock(self, for_write: bool) -> LockedIoBuffers:
        """Pin the buffers for I/O: ``for_write`` when the I/O writes guest memory."""
        if for_write and not self._is_write:
            raise ReadOnlyError()
        if self._len == 0:
            return LockedIoBuffers([])
        host = self._host
        if host is None:
            host = self._resolve()
        if host is False:
            host = self._at(0, self._len)[0]  # raises at the first byte not guest memory
        try:
            views = host.views(for_write)
        except GuestMemoryError as exc:
            raise MemoryAccessError(exc) from exc
        return LockedIoBuffers(views, host if for_write else None)


class MemoryReader:
    """Reads a request's bytes in order; ``len()`` is what is left."""

    __slots__ = ("_buffers", "_end", "_pos")

    def __init__(self, buffers: _Buffers) -> None:
        """Internal: use ``reader()`` of the request's buffers."""
        self._buffers = buffers
        self._pos = 0
        self._end = buffers._len

    def __len__(self) -> int:
        return self._end - self._pos

    def read(self, n: int) -> bytes:
        if n > self._end - self._pos:
            raise OutOfRangeError(self._end - self._pos, n)
        if n <= 0:
            _check_length(n)
            return b""
        host, pos = self._buffers._at(self._pos, n)
        try:
            data = host.read(pos, n)
        except GuestMemoryError as exc:
            raise MemoryAccessError(exc) from exc
        self._pos += n
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:
        """Fill ``buffer`` (all of it) with the next bytes; returns its size."""
        dst = memoryview(buffer)
        if dst.format != "B" or dst.ndim != 1:
            dst = dst.cast("B")
        if dst.readonly:
            raise TypeError("readinto needs a writable buffer")
        n = dst.nbytes
        if n > self._end - self._pos:
            raise OutOfRangeError(self._end - self._pos, n)
        if n == 0:
            return 0
        host, pos = self._buffers._at(self._pos, n)
        try:
            host.readinto(pos, dst)
        except GuestMemoryError as exc:
            raise MemoryAccessError(exc) from exc
        self._pos += n
        return n

    def skip(self, n: int) -> None:
        if n > self._end - self._pos:
            raise OutOfRangeError(self._end - self._pos, n)
        _check_length(n)
        self._pos += n


class MemoryWriter:
    """Writes a request's bytes in order; ``len()`` is what is left (0 when read-only)."""

    __slots__ = ("_buffers", "_end", "_pos", "_read_only")

    def __init__(self, buffers: _Buffers) -> None:
        """Internal: use ``writer()`` of the request's buffers."""
        self._buffers = buffers
        self._pos = 0
        self._read_only = not buffers._is_write
        self._end = 0 if self._read_only else buffers._len

    def __len__(self) -> int:
        return self._end - self._pos

    def _too_long(self, n: int) -> AccessError:
        if self._read_only:
            return ReadOnlyError()
        return OutOfRangeError(self._end - self._pos, n)

    def _check(self, n: int) -> tuple[HostRange, int] | None:
        """Resolve the next ``n`` bytes (None when n is 0), or raise without moving."""
        if n > self._end - self._pos:
            raise self._too_long(n)
        if n <= 0:
            _check_length(n)
            return None
        return self._buffers._at(self._pos, n)

    def write(self, data: Buffer) -> None:
        src = memoryview(data)
        if src.format != "B" or src.ndim != 1:
            src = src.cast("B")
        n = src.nbytes
        at = self._check(n)
        if at is None:
            return
        try:
            at[0].write(at[1], src)
        except GuestMemoryError as exc:
            raise MemoryAccessError(exc) from exc
        self._pos += n

    def fill(self, byte: int, n: int) -> None:
        if not 0 <= byte <= 255:
            raise ValueError(f"fill byte {byte} is not in 0..255")
        at = self._check(n)
        if at is None:
            return
        chunk = _ZEROS if byte == 0 else bytes((byte,)) * min(n, _FILL_CHUNK)
        try:
            at[0].fill(at[1], chunk, n)
        except GuestMemoryError as exc:
            raise MemoryAccessError(exc) from exc
        self._pos += n

    def zero(self, n: int) -> None:
        self.fill(0, n)

    def skip(self, n: int) -> None:
        if n > self._end - self._pos:
            raise self._too_long(n)
        _check_length(n)
        self._pos += n


@runtime_checkable
class IoBuffers(Protocol):
    """What a disk needs from a request's guest buffers (RequestBuffers or MultiRequestBuffers)."""

    @property
    def guest_memory(self) -> GuestMemory: ...

    @property
    def is_write(self) -> bool: ...

    def __len__(self) -> int: ...

    def is_empty(self) -> bool: ...

    def is_aligned(self, alignment: int) -> bool: ...

    def reader(self) -> MemoryReader: ...

    def writer(self) -> MemoryWriter: ...

    def lock(self, for_write: bool) -> LockedIoBuffers: ...

    def subrange(self, offset: int, length: int) -> IoBuffers: ...


class RequestBuffers(_Buffers):
    """One ``PagedRange`` of guest memory for a request; ``is_write``: guest memory is written."""

    __slots__ = ("_range",)

    def __init__(self, guest_memory: GuestMemory, range: PagedRange, is_write: bool) -> None:
        self._mem = guest_memory
        self._range = range
        self._is_write = is_write
        self._len = len(range)
        self._host = None

    def _pieces(self, pos: int, n: int) -> list[tuple[int, int]]:
        return self._range.pieces(pos, n)

    def _all_pieces(self) -> list[tuple[int, int]]:
        return self._range.pieces()

    @property
    def range(self) -> PagedRange:
        return self._range

    def is_aligned(self, alignment: int) -> bool:
        """Whether the first-page offset and the length are multiples of ``alignment``.

        Interior pages are whole, so every iovec is then aligned; above a page this is always
        False, as in OpenVMM.
        """
        mask = _check_alignment(alignment)
        return ((self._range.offset() | self._len | PAGE_SIZE) & mask) == 0

    def subrange(self, offset: int, length: int) -> RequestBuffers:
        return RequestBuffers(self._mem, self._range.subrange(offset, length), self._is_write)

    def __repr__(self) -> str:
        return f"RequestBuffers({self._range!r}, is_write={self._is_write})"


class MultiRequestBuffers(_Buffers):
    """Several ``PagedRange``s of guest memory forming one request, in order."""

    __slots__ = ("_cum", "_parts", "_ranges")

    def __init__(
        self, guest_memory: GuestMemory, ranges: Sequence[PagedRange], is_write: bool
    ) -> None:
        self._mem = guest_memory
        self._ranges = tuple(ranges)
        self._parts = tuple(r for r in self._ranges if not r.is_empty())
        cum = []
        total = 0
        for r in self._parts:
            cum.append(total)
            total += len(r)
        self._cum = tuple(cum)
        self._len = total
        self._is_write = is_write
        self._host = None

    def _pieces(self, pos: int, n: int) -> list[tuple[int, int]]:
        parts = self._parts
        cum = self._cum
        pieces: list[tuple[int, int]] = []
        k = bisect_right(cum, pos) - 1
        while n:
            r = parts[k]
            off = pos - cum[k]
            take = min(n, len(r) - off)
            pieces.extend(r.pieces(off, take))
            pos += take
            n -= take
            k += 1
        return pieces

    @property
    def ranges(self) -> tuple[PagedRange, ...]:
        return self._ranges

    def is_aligned(self, alignment: int) -> bool:
        """Whether every non-empty part is aligned (see ``RequestBuffers.is_aligned``)."""
        mask = _check_alignment(alignment)
        # PAGE_SIZE in the mask test: above a page nothing is aligned, with or without parts.
        return (PAGE_SIZE & mask) == 0 and all(
            ((r.offset() | len(r)) & mask) == 0 for r in self._parts
        )

    def subrange(self, offset: int, length: int) -> MultiRequestBuffers:
        if not (0 <= offset <= self._len and 0 <= length <= self._len - offset):
            raise ValueError(f"invalid subrange: {offset} + {length} > {self._len}")
        out = []
        for r, start in zip(self._parts, self._cum, strict=True):
            lo = max(offset, start)
            hi = min(offset + length, start + len(r))
            if lo < hi:
                out.append(r.subrange(lo - start, hi - lo))
        return MultiRequestBuffers(self._mem, out, self._is_write)

    def __repr__(self) -> str:
        return f"MultiRequestBuffers({list(self._ranges)!r}, is_write={self._is_write})"


def request_buffers_from_buffers(
    guest_memory: GuestMemory, buffers: Sequence[tuple[int, int]], is_write: bool
) -> RequestBuffers | MultiRequestBuffers:
    """A descriptor chain's data buffers ``[(gpa, length), ...]`` as request buffers.

    One ``RequestBuffers`` when they form a single ``PagedRange``, else a ``MultiRequestBuffers``
    split only at the boundaries a PagedRange cannot express.
    """
    if len(buffers) == 1:
        single = paged_range_from_buffers(buffers)
        assert single is not None
        return RequestBuffers(guest_memory, single, is_write)
    ranges = paged_ranges_from_buffers(buffers)
    if len(ranges) == 1:
        return RequestBuffers(guest_memory, ranges[0], is_write)
    return MultiRequestBuffers(guest_memory, ranges, is_write)
