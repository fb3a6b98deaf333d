"""A byte range scattered over guest pages: OpenVMM's ``guestmem::ranges::PagedRange``.

Same model as OpenVMM: a list of guest page numbers, a byte offset into the flat space those
pages imply, and a length; only the first and last pages may be partial, interior pages are
always whole. Page numbers are not checked here but when memory is touched (through
``GuestMemory``), so any integer list is accepted and a bad page surfaces as an ``AccessError``.

Representation differs: instead of one entry per page this keeps the *runs* of consecutive page
numbers (where a run starts in the flat space, its guest address, its length). A 1 MiB
contiguous buffer is then one run; building, subranging, ``ranges()`` and locking are O(runs),
so a guest cannot make the backend build a page list proportional to the bytes it claims (only
``gpns()`` lists pages, for callers that ask).
"""

from __future__ import annotations

import operator
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from memory.errors import GuestMemoryError, GuestMemoryErrorKind, MemoryAccessError
from memory.guest_memory import PAGE_SHIFT, PAGE_SIZE

_PAGE_MASK: Final = PAGE_SIZE - 1
_ADDR_LIMIT: Final = 1 << 64


@dataclass(frozen=True, slots=True)
class AddressRange:
    """Guest physical bytes ``[start, end)``."""

    start: int
    end: int

    def __len__(self) -> int:
        return self.end - self.start

    def is_empty(self) -> bool:
        return self.end == self.start


class PagedRange:
    """``length`` bytes starting ``offset`` bytes into the space of pages ``gpns``."""

    __slots__ = ("_end", "_rg", "_rl", "_rs", "_start")

    _start: int
    _end: int
    # Run k covers the page-aligned flat bytes [_rs[k], _rs[k] + _rl[k]) and maps them to guest
    # addresses starting at the page-aligned _rg[k]. Runs tile the page space in order, and
    # consecutive runs are never guest-contiguous (so they are maximal).
    _rs: tuple[int, ...]
    _rg: tuple[int, ...]
    _rl: tuple[int, ...]

    def __init__(self, offset: int, length: int, gpns: Sequence[int]) -> None:
        npages = len(gpns)
        maxlen = npages * PAGE_SIZE
        if not (0 <= offset <= maxlen and 0 <= length <= maxlen - offset):
            raise ValueError(
                f"range {offset}+{length} does not fit {npages} pages ({maxlen} bytes)"
            )
        rs: list[int] = []
        rg: list[int] = []
        rl: list[int] = []
        if isinstance(gpns, range) and gpns.step == 1:
            if npages:
                rs.append(0)
                rg.append(gpns.start << PAGE_SHIFT)
                rl.append(maxlen)
        else:
            prev = 0
            for i, g in enumerate(gpns):
                if type(g) is not int:
                    g = operator.index(g)  # int subclasses; anything else is a TypeError
                if rs and g == prev + 1:
                    rl[-1] += PAGE_SIZE
                else:
                    rs.append(i << PAGE_SHIFT)
                    rg.append(g << PAGE_SHIFT)
                    rl.append(PAGE_SIZE)
                prev = g
        self._start = offset
        self._end = offset + length
        self._rs = tuple(rs)
        self._rg = tuple(rg)
        self._rl = tuple(rl)

    @classmethod
    def _make(
        cls,
        start: int,
        end: int,
        rs: tuple[int, ...],
        rg: tuple[int, ...],
        rl: tuple[int, ...],
    ) -> PagedRange:
        self = object.__new__(cls)
        self._start = start
        self._end = end
        self._rs = rs
        self._rg = rg
        self._rl = rl
        return self

    @classmethod
    def empty(cls) -> PagedRange:
        return cls._make(0, 0, (), (), ())

    # -- shape ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._end - self._start

    def is_empty(self) -> bool:
        return self._end == self._start

    def offset(self) -> int:
        """Byte offset of the range in its first page."""
        return self._start & _PAGE_MASK

    def gpns(self) -> tuple[int, ...]:
        """The page numbers the range touches, in order (none when it is empty)."""
        if self._end == self._start:
            return ()
        first = self._start & ~_PAGE_MASK
        last = (self._end + _PAGE_MASK) & ~_PAGE_MASK
        out: list[int] = []
        for gpa, n in self._pieces(first, last):
            out.extend(range(gpa >> PAGE_SHIFT, (gpa + n) >> PAGE_SHIFT))
        return tuple(out)

    def subrange(self, offset: int, length: int) -> PagedRange:
        """Bytes ``[offset, offset+length)`` of this range."""
        size = self._end - self._start
        if not (0 <= offset <= size and 0 <= length <= size - offset):
            raise ValueError(f"invalid subrange: {offset} + {length} > {size}")
        start = self._start + offset
        return PagedRange._make(start, start + length, self._rs, self._rg, self._rl)

    def split(self, offset: int) -> tuple[PagedRange, PagedRange]:
        """``(self[:offset], self[offset:])``."""
        return self.subrange(0, offset), self.subrange(offset, len(self) - offset)

    # -- guest addresses ------------------------------------------------------------------

    def _pieces(self, start: int, end: int) -> list[tuple[int, int]]:
        """Guest-contiguous ``(gpa, length)`` pieces for flat offsets ``start < end``."""
        rs = self._rs
        if len(rs) == 1:
            return [(self._rg[0] + start, end - start)]
        k0 = bisect_right(rs, start) - 1
        k1 = bisect_left(rs, end)
        if k1 - k0 == 1:
            return [(self._rg[k0] + start - rs[k0], end - start)]
        out = list(zip(self._rg[k0:k1], self._rl[k0:k1], strict=True))
        skip = start - rs[k0]
        out[0] = (out[0][0] + skip, out[0][1] - skip)
        out[-1] = (out[-1][0], end - rs[k1 - 1])
        return out

    def pieces(self, offset: int = 0, length: int | None = None) -> list[tuple[int, int]]:
        """Bytes ``[offset, offset+length)`` of the range (all of it by default) as maximal
        guest-contiguous ``(gpa, length)`` pieces, in order; none when that is empty.

        Unlike ``ranges()`` the page numbers are not checked: this is what
        ``GuestMemory.resolve`` takes, and it faults any piece that is not guest memory.
        """
        size = self._end - self._start
        if length is None:
            if offset == 0:
                if len(self._rs) == 1:
                    return [(self._rg[0] + self._start, size)] if size else []
                return self._pieces(self._start, self._end) if size else []
            length = size - offset
        if not (0 <= offset <= size and 0 <= length <= size - offset):
            raise ValueError(f"invalid pieces: {offset} + {length} > {size}")
        if length == 0:
            return []
        start = self._start + offset
        return self._pieces(start, start + length)

    def ranges(self) -> list[AddressRange]:
        """The range as maximal runs of guest-contiguous bytes.

        A page number that cannot be a 64-bit guest address raises ``MemoryAccessError``.
        """
        if self._end == self._start:
            return []
        out = []
        for gpa, n in self._pieces(self._start, self._end):
            if gpa < 0 or gpa + n > _ADDR_LIMIT:
                error = GuestMemoryError(
                    f"invalid guest page number for address {gpa:#x}",
                    GuestMemoryErrorKind.INVALID_GPN,
                    gpa,
                    n,
                )
                raise MemoryAccessError(error) from error
            out.append(AddressRange(gpa, gpa + n))
        return out

    def __repr__(self) -> str:
        return f"PagedRange(offset={self.offset()}, length={len(self)}, runs={len(self._rs)})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PagedRange):
            return NotImplemented
        return (
            len(self) == len(other)
            and self.offset() == other.offset()
            and self.gpns() == other.gpns()
        )

    __hash__ = None  # type: ignore[assignment]


def _build(buffers: Iterable[tuple[int, int]], split: bool) -> list[PagedRange] | None:
    """``buffers`` as PagedRanges, a new one at each boundary that is neither contiguous nor
    page-aligned on both sides; None at the first such boundary unless ``split``."""
    mask = _PAGE_MASK
    out: list[PagedRange] = []
    rs: list[int] = []
    rg: list[int] = []
    rl: list[int] = []
    offset = total = 0
    end = -1  # guest address where the current range ends
    flat = 0  # page-space bytes used by the current range's runs
    for gpa, n in buffers:
        if n <= 0 or gpa < 0:
            if n < 0 or gpa < 0:
                raise ValueError(f"negative buffer {gpa}+{n}")
            continue
        new_end = gpa + n
        if gpa == end:
            # Contiguous: the last run grows (possibly not at all, inside its last page).
            grown = ((new_end + mask) & ~mask) - rg[-1]
            flat += grown - rl[-1]
            rl[-1] = grown
        elif rs and not (gpa | end) & mask:
            size = (n + mask) & ~mask
            rs.append(flat)
            rg.append(gpa)
            rl.append(size)
            flat += size
        else:
            if rs:
                if not split:
                    return None
                out.append(
                    PagedRange._make(offset, offset + total, tuple(rs), tuple(rg), tuple(rl))
                )
                rs = []
                rg = []
                rl = []
                total = 0
            offset = gpa & mask
            base = gpa - offset
            flat = ((new_end + mask) & ~mask) - base
            rs.append(0)
            rg.append(base)
            rl.append(flat)
        total += n
        end = new_end
    if rs or not out:
        out.append(PagedRange._make(offset, offset + total, tuple(rs), tuple(rg), tuple(rl)))
    return out


def paged_range_from_buffers(buffers: Sequence[tuple[int, int]]) -> PagedRange | None:
    """A descriptor chain's data buffers ``[(gpa, length), ...]`` as one range.

    Zero-length buffers contribute nothing and are ignored. None when an interior boundary is
    neither contiguous nor page-aligned on both sides (a PagedRange cannot express it).
    """
    if len(buffers) == 1:
        gpa, n = buffers[0]
        if n > 0 and gpa >= 0:
            offset = gpa & _PAGE_MASK
            base = gpa - offset
            size = ((gpa + n + _PAGE_MASK) & ~_PAGE_MASK) - base
            return PagedRange._make(offset, offset + n, (0,), (base,), (size,))
    ranges = _build(buffers, split=False)
    return None if ranges is None else ranges[0]


def paged_ranges_from_buffers(buffers: Sequence[tuple[int, int]]) -> list[PagedRange]:
    """``buffers`` as the fewest PagedRanges, split only at non-mergeable boundaries."""
    ranges = _build(buffers, split=True)
    assert ranges is not None
    return ranges
