"""The guest driver's side of one split virtqueue (virtio 1.2 §2.7), for tests.

Lays a descriptor table, an available ring and a used ring out in a ``GuestMemory`` and plays the
driver: it makes chains available, reads the used ring back, and sets the driver-owned
notification fields. It also has raw hooks to write anything at all (hostile rings).

Stable API (other test suites use it):

``DriverRing(memory, size, desc_gpa, avail_gpa, used_gpa, *, indirect_area=None, reset=True)``
    ``reset`` zeroes the avail/used headers and both event fields. ``indirect_area`` is a
    ``(gpa, length)`` scratch area where :meth:`add_chain` puts indirect tables (bump
    allocated, wrapping around: fine while tables are short-lived).
``DriverRing.at(memory, base, size, **kw)``
    The same, packed from ``base``: table, avail ring right after it, used ring 4-aligned after
    that. ``ring_bytes(size)`` is how many bytes that takes.
Attributes: ``memory``, ``size``, ``desc_gpa``, ``avail_gpa``, ``used_gpa``; ``avail_idx`` (the
driver's free-running count of heads added, published or not), ``published_idx`` (the value in
avail->idx), ``last_used`` (used entries consumed by :meth:`used_entries`), ``num_free``.

Normal driver operations:

- ``add_chain([(gpa, length, device_writable), ...], indirect=False, *, publish=True) -> head``:
  takes free descriptors, chains them (or builds an indirect table in ``indirect_area`` and one
  descriptor pointing at it), writes the head into the next avail slot and, unless
  ``publish=False``, publishes avail->idx. No kick: tests drive the backend directly.
- ``publish()``: write avail->idx = ``avail_idx`` (a batch made with ``publish=False``).
- ``used_entries() -> [(id, len), ...]``: used elements added since the last call; frees the
  descriptors of the chains they return.
- ``chain_of(head) -> [(gpa, length, writable), ...]``: what ``add_chain`` was given.
- ``set_used_event(v)``, ``set_avail_flags(f)``; ``avail_event``, ``used_flags``, ``used_idx``
  (read the device-owned fields).

Raw hooks (no bookkeeping, anything goes): ``write_desc(index, gpa, length, flags, next)``,
``write_desc_at(gpa, ...)`` (an entry of an indirect table you place yourself),
``write_avail_slot(slot, head)``, ``set_avail_idx(v)``, ``push_head(head, publish=True)`` (make
an arbitrary head available), ``write_desc_table(data)``, ``write_avail_ring(data)`` (raw
bytes over the ring entries).

Single stores: every driver-owned field the device reads concurrently (avail->flags,
avail->idx, avail->ring entries, used_event) is written with ``GuestMemory.write_u16``, which is
one aligned 2-byte store (``memory.shared``: never ``struct.pack_into``, which zeroes the field
first and so is two stores). A torn store here would make the backend under test see
avail->idx jump and break the ring, masking or faking its bugs. Python cannot emit barriers;
the backend runs on another CPython thread or process, and x86 (TSO) keeps stores in program
order, which is all the driver side of §2.7.13 needs.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Final

from memory import GuestMemory

VIRTQ_DESC_F_NEXT: Final = 1
VIRTQ_DESC_F_WRITE: Final = 2
VIRTQ_DESC_F_INDIRECT: Final = 4
VIRTQ_AVAIL_F_NO_INTERRUPT: Final = 1
VIRTQ_USED_F_NO_NOTIFY: Final = 1

DESC: Final = struct.Struct("<QIHH")
"""virtq_desc: addr, len, flags, next."""
USED_ELEM: Final = struct.Struct("<II")
"""virtq_used_elem: id, len."""

Buffer = tuple[int, int, bool]


def ring_bytes(size: int) -> int:
    """Bytes :meth:`DriverRing.at` uses for a ring of ``size`` from a 16-aligned base."""
    avail_end = 16 * size + 6 + 2 * size
    return ((avail_end + 3) & ~3) + 6 + 8 * size


class DriverRing:
    """One split ring, driver side. See the module docstring for the API."""

    def __init__(
        self,
        memory: GuestMemory,
        size: int,
        desc_gpa: int,
        avail_gpa: int,
        used_gpa: int,
        *,
        indirect_area: tuple[int, int] | None = None,
        reset: bool = True,
    ) -> None:
        if size <= 0 or size & (size - 1) or size > 32768:
            raise ValueError(f"queue size {size} is not a power of two in 1..32768")
        self.memory = memory
        self.size = size
        self.desc_gpa = desc_gpa
        self.avail_gpa = avail_gpa
        self.used_gpa = used_gpa
        self.avail_idx = 0
        self.published_idx = 0
        self.last_used = 0
        self._free = list(range(size))
        self._chains: dict[int, tuple[list[int], list[Buffer]]] = {}
        self._indirect_area = indirect_area
        self._indirect_next = 0
        if reset:
            for gpa in (avail_gpa, avail_gpa + 2, avail_gpa + 4 + 2 * size):
                memory.write_u16(gpa, 0)
            for gpa in (used_gpa, used_gpa + 2, used_gpa + 4 + 8 * size):
                memory.write_u16(gpa, 0)

    @classmethod
    def at(
        cls,
        memory: GuestMemory,
        base: int,
        size: int,
        *,
        indirect_area: tuple[int, int] | None = None,
        reset: bool = True,
    ) -> DriverRing:
        desc = (base + 15) & ~15
        avail = desc + 16 * size
        used = (avail + 6 + 2 * size + 3) & ~3
        return cls(memory, size, desc, avail, used, indirect_area=indirect_area, reset=reset)

    @property
    def num_free(self) -> int:
        return len(self._free)

    # -- driver operations ----------------------------------------------------------------

    def add_chain(
        self, buffers: Sequence[Buffer], indirect: bool = False, *, publish: bool = True
    ) -> int:
        if not buffers:
            raise ValueError("a chain needs at least one buffer")
        if indirect:
            ids = self._take(1)
            table = self._alloc_table(16 * len(buffers))
            self._write_links(buffers, lambda n: table + 16 * n, list(range(len(buffers))))
            self.write_desc(ids[0], table, 16 * len(buffers), VIRTQ_DESC_F_INDIRECT, 0)
        else:
            ids = self._take(len(buffers))
            self._write_links(buffers, lambda n: self.desc_gpa + 16 * ids[n], ids)
        head = ids[0]
        self._chains[head] = (ids, list(buffers))
        self.push_head(head, publish=publish)
        return head

    def publish(self) -> None:
        self.set_avail_idx(self.avail_idx)

    def used_entries(self) -> list[tuple[int, int]]:
        out = []
        used_idx = self.used_idx
        while self.last_used != used_idx:
            slot = self.used_gpa + 4 + 8 * (self.last_used % self.size)
            elem_id, length = USED_ELEM.unpack(self.memory.read_at(slot, USED_ELEM.size))
            out.append((elem_id, length))
            ids, _ = self._chains.pop(elem_id, ([], []))
            self._free.extend(ids)
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    def chain_of(self, head: int) -> list[Buffer]:
        return list(self._chains[head][1])

    def set_used_event(self, value: int) -> None:
        self.memory.write_u16(self.avail_gpa + 4 + 2 * self.size, value & 0xFFFF)

    def set_avail_flags(self, flags: int) -> None:
        self.memory.write_u16(self.avail_gpa, flags)

    @property
    def avail_event(self) -> int:
        return self.memory.read_u16(self.used_gpa + 4 + 8 * self.size)

    @property
    def used_flags(self) -> int:
        return self.memory.read_u16(self.used_gpa)

    @property
    def used_idx(self) -> int:
        return self.memory.read_u16(self.used_gpa + 2)

    # -- raw hooks ------------------------------------------------------------------------

    def write_desc(self, index: int, gpa: int, length: int, flags: int, next_: int) -> None:
        self.write_desc_at(self.desc_gpa + 16 * index, gpa, length, flags, next_)

    def write_desc_at(self, at: int, gpa: int, length: int, flags: int, next_: int) -> None:
        self.memory.write_at(at, DESC.pack(gpa, length, flags, next_))

    def write_avail_slot(self, slot: int, head: int) -> None:
        self.memory.write_u16(self.avail_gpa + 4 + 2 * (slot % self.size), head)

    def set_avail_idx(self, value: int) -> None:
        value &= 0xFFFF
        self.memory.write_u16(self.avail_gpa + 2, value)
        self.published_idx = value

    def push_head(self, head: int, *, publish: bool = True) -> None:
        self.write_avail_slot(self.avail_idx, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        if publish:
            self.publish()

    def write_desc_table(self, data: bytes) -> None:
        if len(data) > 16 * self.size:
            raise ValueError("more bytes than the descriptor table holds")
        self.memory.write_at(self.desc_gpa, data)

    def write_avail_ring(self, data: bytes) -> None:
        if len(data) > 2 * self.size:
            raise ValueError("more bytes than the available ring entries hold")
        self.memory.write_at(self.avail_gpa + 4, data)

    # -- internals ------------------------------------------------------------------------

    def _take(self, n: int) -> list[int]:
        if n > len(self._free):
            raise ValueError(f"{n} descriptors wanted, {len(self._free)} free")
        ids, self._free = self._free[:n], self._free[n:]
        return ids

    def _alloc_table(self, nbytes: int) -> int:
        if self._indirect_area is None:
            raise ValueError("indirect chains need an indirect_area")
        start, length = self._indirect_area
        if nbytes > length:
            raise ValueError(f"indirect table of {nbytes} bytes does not fit the area")
        if self._indirect_next + nbytes > length:
            self._indirect_next = 0
        gpa = start + self._indirect_next
        self._indirect_next = (self._indirect_next + nbytes + 15) & ~15
        return gpa

    def _write_links(
        self, buffers: Sequence[Buffer], where: Callable[[int], int], links: Sequence[int]
    ) -> None:
        last = len(buffers) - 1
        for n, (gpa, length, writable) in enumerate(buffers):
            flags = (VIRTQ_DESC_F_WRITE if writable else 0) | (VIRTQ_DESC_F_NEXT if n < last else 0)
            self.write_desc_at(where(n), gpa, length, flags, links[n + 1] if n < last else 0)
