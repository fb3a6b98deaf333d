"""Guest physical memory, as a vhost-user backend sees it.

The counterpart of OpenVMM's ``guestmem::GuestMemory``. OpenVMM reserves one linear mapping for
all of guest memory; a vhost-user backend instead receives a table of regions, each an fd to
``mmap`` plus the guest physical and front-end virtual address where it lives
(vhost-user.rst, "Memory region description"). So this type keeps a sorted table of mapped
regions and resolves every access against it.

Lifetime: ``close()`` never unmaps under a live view. It detaches the table (every later access
fails with ``GuestMemoryErrorKind.CLOSED``) and drops this object's references; CPython unmaps
a region when the last memoryview derived from it goes away. A ``LockedIoBuffers`` holds such
views, so a region closed while locked stays mapped until the lock is released: close is
*deferred*, never refused, and never raises ``BufferError``. The same holds for ``view()``s a
ring keeps across a memory-table change.

Validation stops a front-end from making the backend map past the end of a file (any access
there is SIGBUS). A front-end that shrinks the file *after* the table was accepted could still
do that, and nothing here can catch SIGBUS in Python. So a memfd that allows sealing is sealed
against shrinking before its size is checked (QEMU's memory-backend-memfd is sealed already,
``seal=on``); a file that cannot be sealed stays the front-end's to keep whole.
"""

from __future__ import annotations

import fcntl
import itertools
import mmap
import os
import stat
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Final, NamedTuple

from memory.errors import GuestMemoryError, GuestMemoryErrorKind
from memory.shared import words

PAGE_SIZE: Final = 4096
PAGE_SHIFT: Final = 12
_PAGE_MASK: Final = PAGE_SIZE - 1
_ADDR_LIMIT: Final = 1 << 64
_OFF_T_LIMIT: Final = 1 << 63


@dataclass(frozen=True, slots=True)
class MemoryRegion:
    """One entry of a vhost-user memory table (VhostUserMemoryRegion plus its fd).

    ``fd`` is borrowed: ``GuestMemory`` maps it (the mapping keeps its own reference to the
    file) and never closes it; the caller does.
    """

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int
    fd: int


class _Mapped(NamedTuple):
    """A mapped region. The mmap offset of guest address ``gpa`` is ``gpa - bias``.

    The mapping starts on a page, so an mmap offset's alignment is its host address's. ``w16``,
    ``w32`` and ``w64`` are the mapping as items of 2, 4 and 8 bytes (``memory.shared.words``):
    ``w16[off >> 1] = v`` is one aligned store at mmap offset ``off``.
    """

    start: int
    end: int
    bias: int
    mm: mmap.mmap
    rw: memoryview
    ro: memoryview
    w16: memoryview
    w32: memoryview
    w64: memoryview


def _items(e: _Mapped, size: int) -> memoryview:
    """``e``'s mapping as items of ``size`` bytes (2, 4 or 8)."""
    return e.w16 if size == 2 else e.w32 if size == 4 else e.w64


# One resolved piece of an access: (region, mmap offset, length).
Segment = tuple[_Mapped, int, int]

_EMPTY_LUT: Final[tuple[list[int], tuple[_Mapped, ...]]] = ([], ())


def _invalid(message: str, gpa: int | None = None) -> GuestMemoryError:
    return GuestMemoryError(message, GuestMemoryErrorKind.INVALID_REGION, gpa)


def _validate(regions: Sequence[MemoryRegion]) -> list[int]:
    """Check ``regions``; returns the offset alignment each fd's mmap needs."""
    for r in regions:
        fields = (r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset, r.fd)
        if not all(type(v) is int for v in fields):
            raise TypeError(f"memory region fields must be ints: {r!r}")
        gpa, size, uva, off = r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset
        if size <= 0 or size & _PAGE_MASK:
            raise _invalid(f"region size {size:#x} is not a positive multiple of {PAGE_SIZE}", gpa)
        if gpa < 0 or gpa & _PAGE_MASK or gpa + size > _ADDR_LIMIT:
            raise _invalid(f"region guest address {gpa:#x}+{size:#x} is misaligned or overflows")
        if uva < 0 or uva & _PAGE_MASK or uva + size > _ADDR_LIMIT:
            raise _invalid(f"region user address {uva:#x}+{size:#x} is misaligned or overflows")
        if off < 0 or off + size >= _OFF_T_LIMIT:
            raise _invalid(f"region mmap offset {off:#x}+{size:#x} overflows", gpa)
        if r.fd < 0:
            raise _invalid(f"region fd {r.fd} is invalid", gpa)
    for key in ("guest_phys_addr", "userspace_addr"):
        spans = sorted((getattr(r, key), getattr(r, key) + r.memory_size) for r in regions)
        for (_, end), (start, _) in itertools.pairwise(spans):
            if start < end:
                raise _invalid(f"regions overlap ({key} {start:#x} < {end:#x})")
    aligns = []
    for r in regions:
        _seal_against_shrinking(r.fd)
        try:
            st = os.fstat(r.fd)
        except (OSError, OverflowError) as exc:
            raise GuestMemoryError(
                f"region fd {r.fd}: {getattr(exc, 'strerror', None) or exc}",
                GuestMemoryErrorKind.MAP_FAILED,
                r.guest_phys_addr,
            ) from None
        # Mapping past the end of a file is allowed by mmap(2) but any access there raises
        # SIGBUS, which would let the front-end kill the backend. Only regular files (memfd,
        # hugetlbfs, tmpfs) have a meaningful size.
        if not stat.S_ISREG(st.st_mode) or st.st_size < r.mmap_offset + r.memory_size:
            what = f"{st.st_size:#x} bytes" if stat.S_ISREG(st.st_mode) else "not a regular file"
            raise GuestMemoryError(
                f"region at {r.guest_phys_addr:#x}: mmap_offset {r.mmap_offset:#x} + size "
                f"{r.memory_size:#x} is past the end of its file ({what})",
                GuestMemoryErrorKind.FILE_TOO_SMALL,
                r.guest_phys_addr,
            )
        # hugetlbfs wants file offsets aligned to its page size, which it reports as
        # st_blksize (libvhost-user maps from offset 0 for the same reason).
        blksize = st.st_blksize
        huge = blksize > PAGE_SIZE and not blksize & (blksize - 1) and blksize <= 1 << 30
        aligns.append(max(mmap.ALLOCATIONGRANULARITY, blksize if huge else 0))
    return aligns


def _seal_against_shrinking(fd: int) -> None:
    """Add F_SEAL_SHRINK to a memfd that allows sealing, before its size is checked.

    Then the size check holds for the mapping's lifetime: a front-end cannot truncate the
    file under us later (an access past the new end would be SIGBUS, which Python cannot
    catch). Guest RAM never shrinks, so a well-behaved front-end loses nothing; QEMU's
    memory-backend-memfd seals it already. Files that cannot be sealed (hugetlbfs, tmpfs
    files, memfds created without MFD_ALLOW_SEALING) are left as they are.
    """
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    except (OSError, OverflowError):
        pass


class GuestMemory:
    """Guest physical memory built from vhost-user regions (or allocated, for tests)."""

    __slots__ = ("__weakref__", "_closed", "_lut", "_regions", "_uva")

    def __init__(
        self, regions: Iterable[MemoryRegion], maps: Sequence[mmap.mmap], deltas: Sequence[int]
    ) -> None:
        """Internal: use :meth:`from_regions` or :meth:`allocate`."""
        self._regions = tuple(regions)
        entries = []
        for r, mm, delta in zip(self._regions, maps, deltas, strict=True):
            rw = memoryview(mm)
            # Whole items only: a mapping is pages plus an mmap-offset delta, so at most the
            # last item of a width is cut off (and then no access of that width fits there).
            entries.append(
                _Mapped(
                    r.guest_phys_addr,
                    r.guest_phys_addr + r.memory_size,
                    r.guest_phys_addr - delta,
                    mm,
                    rw,
                    rw.toreadonly(),
                    words(rw[: len(rw) & ~1], "H"),
                    words(rw[: len(rw) & ~3], "I"),
                    words(rw[: len(rw) & ~7], "Q"),
                )
            )
        entries.sort(key=lambda e: e.start)
        self._lut: tuple[list[int], tuple[_Mapped, ...]] = (
            [e.start for e in entries],
            tuple(entries),
        )
        self._uva = tuple(
            (r.userspace_addr, r.userspace_addr + r.memory_size, r.guest_phys_addr)
            for r in self._regions
        )
        self._closed = False

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_regions(cls, regions: Iterable[MemoryRegion]) -> GuestMemory:
        """Validate ``regions`` and map each fd shared read-write.

        Raises ``GuestMemoryError`` (nothing left mapped) for a malformed table, a file too
        small for its region, or an fd the kernel will not map.
        """
        regions = tuple(regions)
        aligns = _validate(regions)
        maps: list[mmap.mmap] = []
        deltas: list[int] = []
        try:
            for r, align in zip(regions, aligns, strict=True):
                # mmap wants an aligned file offset: map from below and skip the difference.
                delta = r.mmap_offset % align
                maps.append(
                    mmap.mmap(
                        r.fd,
                        r.memory_size + delta,
                        flags=mmap.MAP_SHARED,
                        prot=mmap.PROT_READ | mmap.PROT_WRITE,
                        offset=r.mmap_offset - delta,
                    )
                )
                deltas.append(delta)
        except (OSError, ValueError, OverflowError) as exc:
            for mm in maps:
                mm.close()
            raise GuestMemoryError(
                f"cannot map region {len(maps)}: {exc}",
                GuestMemoryErrorKind.MAP_FAILED,
                regions[len(maps)].guest_phys_addr,
            ) from None
        return cls(regions, maps, deltas)

    @classmethod
    def allocate(cls, size: int) -> GuestMemory:
        """Anonymous shared memory of ``size`` bytes (rounded up to a page) at guest address 0.

        Its single region has user address 0 (so ``translate_uva`` is the identity) and fd -1.
        """
        if type(size) is not int or size <= 0:
            raise ValueError(f"size must be a positive int, not {size!r}")
        size = (size + _PAGE_MASK) & ~_PAGE_MASK
        mm = mmap.mmap(-1, size, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        return cls((MemoryRegion(0, size, 0, 0, -1),), (mm,), (0,))

    # -- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        """Detach every region; idempotent. Later accesses fail with kind ``CLOSED``.

        Regions are unmapped as soon as no locked buffers (or other views) refer to them.
        """
        self._closed = True
        self._lut = _EMPTY_LUT
        self._uva = ()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def regions(self) -> tuple[MemoryRegion, ...]:
        """The memory table this was built from, in the order given."""
        return self._regions

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._regions)} regions"
        return f"<GuestMemory {state}>"

    # -- flat access ----------------------------------------------------------------------

    def _fault(self, gpa: int, length: int) -> GuestMemoryError:
        if self._closed:
            return GuestMemoryError(
                "guest memory is closed", GuestMemoryErrorKind.CLOSED, gpa, length
            )
        return GuestMemoryError(
            f"no guest memory at {gpa:#x}+{length:#x}",
            GuestMemoryErrorKind.OUT_OF_RANGE,
            gpa,
            length,
        )

    def _find(self, gpa: int, length: int) -> tuple[_Mapped, int]:
        """The region wholly containing ``[gpa, gpa+length)`` and the mmap offset of gpa."""
        starts, entries = self._lut
        i = bisect_right(starts, gpa) - 1
        if i >= 0:
            e = entries[i]
            if gpa + length <= e.end:
                return e, gpa - e.bias
        raise self._fault(gpa, length)

    def read_at(self, gpa: int, n: int) -> bytes:
        """``n`` bytes at ``gpa``, which must lie inside one region."""
        if n <= 0:
            if n == 0:
                return b""
            raise ValueError(f"negative length {n}")
        e, off = self._find(gpa, n)
        return e.mm[off : off + n]

    def write_at(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``gpa``, which must lie inside one region with it."""
        if isinstance(data, memoryview):
            n = data.nbytes
            if not data.c_contiguous:
                data = data.tobytes()
        else:
            n = len(data)
        if n == 0:
            return
        e, off = self._find(gpa, n)
        e.mm[off : off + n] = data

    def view(self, gpa: int, n: int, writable: bool = False) -> memoryview:
        """A memoryview aliasing ``[gpa, gpa+n)`` inside one region (read-only unless asked)."""
        if n < 0:
            raise ValueError(f"negative length {n}")
        if n == 0:
            return memoryview(bytearray() if writable else b"")
        e, off = self._find(gpa, n)
        return (e.rw if writable else e.ro)[off : off + n]

    # Fixed-width little-endian fields. An access at a naturally aligned host address is one
    # load or store of its width (memory.shared: another agent may be reading it); an
    # unaligned one (only possible with an unaligned mmap offset, or an unaligned gpa) is a
    # byte copy, with no such promise.

    def read_u16(self, gpa: int) -> int:
        return self._read_fixed(2, gpa)

    def read_u32(self, gpa: int) -> int:
        return self._read_fixed(4, gpa)

    def read_u64(self, gpa: int) -> int:
        return self._read_fixed(8, gpa)

    def write_u16(self, gpa: int, value: int) -> None:
        self._write_fixed(2, gpa, value)

    def write_u32(self, gpa: int, value: int) -> None:
        self._write_fixed(4, gpa, value)

    def write_u64(self, gpa: int, value: int) -> None:
        self._write_fixed(8, gpa, value)

    def _read_fixed(self, size: int, gpa: int) -> int:
        e, off = self._find(gpa, size)
        if off % size:
            return int.from_bytes(e.mm[off : off + size], "little")
        return int(_items(e, size)[off // size])

    def _write_fixed(self, size: int, gpa: int, value: int) -> None:
        if type(value) is not int or not 0 <= value < 1 << (8 * size):
            raise ValueError(f"{value!r} does not fit {size} bytes")
        e, off = self._find(gpa, size)
        if off % size:
            e.mm[off : off + size] = value.to_bytes(size, "little")
        else:
            _items(e, size)[off // size] = value

    def host_aligned(self, gpa: int, align: int) -> bool:
        """Whether mapped guest address ``gpa`` lies at a host address that is a multiple of
        ``align`` (a power of two up to a page). Guest alignment implies it unless the
        front-end gave an unaligned mmap offset."""
        _, off = self._find(gpa, 1)
        return off % align == 0

    def translate_uva(self, uva: int, length: int) -> int:
        """The guest physical address of front-end virtual address ``uva``.

        ``[uva, uva+length)`` must lie inside one region (vring addresses arrive as front-end
        virtual addresses; vhost-user.rst, "Vring address description").
        """
        if length < 0:
            raise ValueError(f"negative length {length}")
        for ustart, uend, gstart in self._uva:
            if ustart <= uva and uva + length <= uend and (length or uva < uend):
                return gstart + (uva - ustart)
        if self._closed:
            raise GuestMemoryError(
                "guest memory is closed", GuestMemoryErrorKind.CLOSED, None, length
            )
        raise GuestMemoryError(
            f"user address {uva:#x}+{length:#x} is not inside one region",
            GuestMemoryErrorKind.OUT_OF_RANGE,
            None,
            length,
        )

    # -- paged access (used by PagedRange / RequestBuffers) -------------------------------

    def _resolve(self, pieces: Iterable[tuple[int, int]]) -> list[Segment]:
        """Map guest-contiguous ``(gpa, length)`` pieces to segments, each inside one region.

        A piece may run across adjacent regions; it is then split. Raises GuestMemoryError at
        the first byte that is not guest memory, before anything is accessed.
        """
        starts, entries = self._lut
        out: list[Segment] = []
        append = out.append
        e = entries[0] if entries else None
        for gpa, n in pieces:
            if e is not None and e.start <= gpa and gpa + n <= e.end:
                append((e, gpa - e.bias, n))
                continue
            while True:
                i = bisect_right(starts, gpa) - 1
                if i < 0:
                    raise self._fault(gpa, n)
                e = entries[i]
                avail = e.end - gpa
                if avail <= 0:
                    raise self._fault(gpa, n)
                if n <= avail:
                    append((e, gpa - e.bias, n))
                    break
                append((e, gpa - e.bias, avail))
                gpa += avail
                n -= avail
        return out

    def _views(self, pieces: Sequence[tuple[int, int]], writable: bool) -> list[memoryview]:
        """Like ``_resolve`` but straight to memoryviews (the lock fast path)."""
        starts, entries = self._lut
        out: list[memoryview] = []
        append = out.append
        start = end = bias = 0
        base: memoryview | None = None
        for gpa, n in pieces:
            if base is None or gpa < start or gpa + n > end:
                i = bisect_right(starts, gpa) - 1
                if i < 0 or gpa + n > entries[i].end:
                    # Not inside one region: split across adjacent regions, or raise.
                    return [
                        (e.rw if writable else e.ro)[off : off + ln]
                        for e, off, ln in self._resolve(pieces)
                    ]
                e = entries[i]
                start, end, bias, base = e.start, e.end, e.bias, (e.rw if writable else e.ro)
            off = gpa - bias
            append(base[off : off + n])
        return out
