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

Writes. Every store into guest memory made here is reported to the memory's ``WriteTracker``
(``writes``), the choke point dirty logging hooks into (``memory.write_tracker``). Paged access
goes through ``resolve``: guest pieces become a ``HostRange`` once, and the request buffers read,
write and lock through it, so their stores are reported here too.

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
from memory.write_tracker import WriteTracker

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
        seal_against_shrinking(r.fd)
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


def seal_against_shrinking(fd: int) -> None:
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

    __slots__ = ("__weakref__", "_closed", "_lut", "_regions", "_uva", "_writes")

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
        self._writes = WriteTracker()

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

    @property
    def writes(self) -> WriteTracker:
        """Where every write into this memory is reported (``memory.write_tracker``)."""
        return self._writes

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
        writes = self._writes
        if writes.active:
            writes.note(gpa, n)

    def view(self, gpa: int, n: int, writable: bool = False) -> memoryview:
        """A memoryview aliasing ``[gpa, gpa+n)`` inside one region (read-only unless asked).

        Stores through a writable view bypass the write choke point: whoever makes them
        reports each one to ``writes`` by guest address (the split ring does).
        """
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
        writes = self._writes
        if writes.active:
            writes.note(gpa, size)

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

    # -- paged access (used by RequestBuffers) ---------------------------------------------

    def resolve(self, pieces: Sequence[tuple[int, int]]) -> HostRange:
        """Guest-contiguous ``(gpa, length)`` pieces (each length > 0), in order, resolved to
        host memory once: the bytes of a ``HostRange`` are the pieces' bytes, concatenated.

        A piece may run across adjacent regions; it is then split. Raises GuestMemoryError at
        the first byte that is not guest memory (kind CLOSED once closed), before anything is
        accessed.
        """
        starts, entries = self._lut
        if len(pieces) == 1:
            # The common case: one piece inside one region.
            gpa, n = pieces[0]
            i = bisect_right(starts, gpa) - 1
            if i >= 0:
                only = entries[i]
                if gpa + n <= only.end:
                    return HostRange(self, ((i, gpa - only.bias, n, gpa),), None)
        segs: list[_HostSegment] = []
        append = segs.append
        i = 0
        e = entries[0] if entries else None
        for gpa, n in pieces:
            if e is not None and e.start <= gpa and gpa + n <= e.end:
                append((i, gpa - e.bias, n, gpa))
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
                    append((i, gpa - e.bias, n, gpa))
                    break
                append((i, gpa - e.bias, avail, gpa))
                gpa += avail
                n -= avail
        if len(segs) == 1:
            return HostRange(self, segs, None)
        flat = []
        total = 0
        for seg in segs:
            flat.append(total)
            total += seg[2]
        return HostRange(self, segs, flat)


# A resolved piece: (index in the sorted region table, mmap offset, length, guest address).
_HostSegment = tuple[int, int, int, int]
# A piece of an access: (region, mmap offset, length, guest address).
_Piece = tuple[_Mapped, int, int, int]


class HostRange:
    """Guest bytes resolved to places in a ``GuestMemory``'s mappings (``GuestMemory.resolve``).

    Positions are offsets into the concatenated bytes, ``0 <= pos`` and ``pos + n <= len()``
    (the caller's bounds, n > 0; nothing here re-checks them). It keeps region *indices*, never
    the mappings, so it does not keep a region mapped after ``close()``; every access after
    close raises GuestMemoryError of kind CLOSED, as a fresh ``resolve`` would. Stores are
    reported to the memory's ``WriteTracker`` (``writes``) after they are made; a writable
    lock's holder calls ``note_written`` once its I/O is done.
    """

    __slots__ = ("_mem", "_segs", "_starts", "writes")

    def __init__(
        self,
        mem: GuestMemory,
        segs: Sequence[_HostSegment],
        starts: list[int] | None,
    ) -> None:
        """Internal: use :meth:`GuestMemory.resolve`. ``starts``: where each segment begins
        in the concatenated bytes (None for one segment)."""
        self._mem = mem
        self._segs = segs
        self._starts = starts
        self.writes = mem._writes

    def __len__(self) -> int:
        return sum(seg[2] for seg in self._segs)

    def _pieces(self, pos: int, n: int) -> list[_Piece]:
        """Bytes ``[pos, pos+n)`` (n > 0) as (region, mmap offset, length, gpa) pieces."""
        entries = self._mem._lut[1]
        segs = self._segs
        if len(segs) == 1:
            i, off, _, gpa = segs[0]
            if entries:
                return [(entries[i], off + pos, n, gpa + pos)]
            raise self._mem._fault(gpa + pos, n)
        starts = self._starts
        assert starts is not None
        k = bisect_right(starts, pos) - 1
        skip = pos - starts[k]
        if not entries:
            raise self._mem._fault(segs[k][3] + skip, n)
        out: list[_Piece] = []
        while n:
            i, off, ln, gpa = segs[k]
            take = min(n, ln - skip)
            out.append((entries[i], off + skip, take, gpa + skip))
            n -= take
            skip = 0
            k += 1
        return out

    def read(self, pos: int, n: int) -> bytes:
        """A copy of bytes ``[pos, pos+n)``."""
        pieces = self._pieces(pos, n)
        if len(pieces) == 1:
            e, off, ln, _ = pieces[0]
            return e.mm[off : off + ln]
        return b"".join([e.mm[off : off + ln] for e, off, ln, _ in pieces])

    def readinto(self, pos: int, dst: memoryview) -> None:
        """Copy bytes ``[pos, pos+len(dst))`` into the byte view ``dst``."""
        p = 0
        for e, off, ln, _ in self._pieces(pos, dst.nbytes):
            dst[p : p + ln] = e.ro[off : off + ln]
            p += ln

    def write(self, pos: int, src: memoryview) -> None:
        """Copy the byte view ``src`` over bytes ``[pos, pos+len(src))``; reports them."""
        pieces = self._pieces(pos, src.nbytes)
        p = 0
        for e, off, ln, _ in pieces:
            e.rw[off : off + ln] = src[p : p + ln]
            p += ln
        writes = self.writes
        if writes.active:
            for _, _, ln, gpa in pieces:
                writes.note(gpa, ln)

    def fill(self, pos: int, chunk: bytes, n: int) -> None:
        """Store ``n`` bytes at ``pos``, repeating ``chunk`` (a run of one byte value, at least
        as long as any piece or repeated); reports them."""
        pieces = self._pieces(pos, n)
        size = len(chunk)
        for e, off, ln, _ in pieces:
            end = off + ln
            while off < end:
                step = min(end - off, size)
                e.mm[off : off + step] = chunk if step == size else chunk[:step]
                off += step
        writes = self.writes
        if writes.active:
            for _, _, ln, gpa in pieces:
                writes.note(gpa, ln)

    def views(self, writable: bool) -> list[memoryview]:
        """All the bytes as memoryviews, one per segment (read-only unless ``writable``).

        Stores through writable views are the caller's to report (``note_written``).
        """
        entries = self._mem._lut[1]
        segs = self._segs
        if not entries:
            raise self._mem._fault(segs[0][3], segs[0][2])
        if len(segs) == 1:
            i, off, n, _ = segs[0]
            e = entries[i]
            return [(e.rw if writable else e.ro)[off : off + n]]
        if writable:
            return [entries[i].rw[off : off + n] for i, off, n, _ in self._segs]
        return [entries[i].ro[off : off + n] for i, off, n, _ in self._segs]

    def note_written(self) -> None:
        """Report all the bytes written (after I/O through writable ``views``)."""
        writes = self.writes
        for _, _, n, gpa in self._segs:
            writes.note(gpa, n)
