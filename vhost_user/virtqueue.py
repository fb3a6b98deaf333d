"""Split virtqueues, device (backend) side: virtio 1.2 §2.7.

A :class:`SplitVirtqueue` turns the guest's available ring into :class:`DescriptorChain` values
and returns finished chains through the used ring. It trusts nothing in guest memory:

- Ring-level nonsense (avail->idx more than a queue's worth ahead of us) raises
  :class:`GuestFault` from :meth:`SplitVirtqueue.pop`; the caller stops the queue.
- Chain-level nonsense never raises: the chain comes back with ``fault`` set (see
  ``vhost_user.chain``). Structural faults (bad index, loop, malformed indirect table) end the
  walk (``complete=False``); buffer faults (outside guest memory, zero length, readable after
  writable, more than 4 GiB - 1 in total) are recorded and the walk goes on (``complete=True``).
- Every walk is bounded: at most ``size`` descriptors of the descriptor table, then at most one
  indirect table of at most ``max(size, 1024)`` descriptors (``indirect_limit``). The spec
  forbids chains longer than the queue (§2.7.5.3.1); the 1024 floor tolerates drivers whose
  indirect tables follow a ``seg_max`` sized for a larger queue (QEMU caps a chain at 1024
  buffers too), while keeping a hostile pop cheap.
- Each descriptor is read exactly once (indirect tables are copied out first), so a guest
  rewriting descriptors under us cannot make what we checked differ from what we return.

Memory ordering. The guest driver runs on other CPUs, so the order of our loads and stores to
the rings matters. Three kinds of barrier appear below, each commented where it is needed:

- read barrier (load-load) and write barrier (store-store): x86-64 (TSO) never reorders loads
  with loads or stores with stores, and in CPython every ring access is a separate call into C
  that the compiler cannot move others across. So these cost nothing here; the comments mark
  where the C twin needs ``__atomic_thread_fence(__ATOMIC_ACQUIRE / __ATOMIC_RELEASE)``.
- full barrier (store-load): even x86 lets a later load pass an earlier store (store buffer).
  :meth:`SplitVirtqueue._full_barrier` acquires and releases a ``threading.Lock``: CPython's lock
  is a glibc semaphore whose fast paths are ``lock cmpxchg`` / ``lock xadd``, and a LOCK-prefixed
  instruction drains the store buffer, i.e. a full fence on x86. (On weakly ordered hosts an
  acquire+release pair is not a full fence; this backend targets x86-64 QEMU hosts, and the C
  twin will use ``__atomic_thread_fence(__ATOMIC_SEQ_CST)``.)

Single accesses: ring indices must not be torn. ``struct`` formats with ``<`` on a
little-endian host use CPython's native ``memcpy`` accessors, which compile to one aligned 2- or
4-byte load/store; the constructor checks ring alignment, so avail->idx, used->idx and the event
fields are naturally aligned.
"""

from __future__ import annotations

import struct
import threading
from bisect import bisect_right
from typing import Final, Protocol

from memory import GuestMemory, GuestMemoryError
from vhost_user.chain import Descriptor, DescriptorChain
from vhost_user.errors import GuestFault

VIRTQ_DESC_F_NEXT: Final = 1
VIRTQ_DESC_F_WRITE: Final = 2
VIRTQ_DESC_F_INDIRECT: Final = 4
VIRTQ_AVAIL_F_NO_INTERRUPT: Final = 1
VIRTQ_USED_F_NO_NOTIFY: Final = 1

MAX_QUEUE_SIZE: Final = 32768
MIN_INDIRECT_LIMIT: Final = 1024
"""An indirect table may hold ``max(queue size, MIN_INDIRECT_LIMIT)`` descriptors."""
_U32_MAX: Final = 0xFFFF_FFFF

DESC: Final = struct.Struct("<QIHH")
"""virtq_desc (§2.7.5): addr, len, flags, next."""
USED_ELEM: Final = struct.Struct("<II")
"""virtq_used_elem (§2.7.8): id, len."""
U16: Final = struct.Struct("<H")

_desc_from = DESC.unpack_from
_u16_from = U16.unpack_from
_u16_into = U16.pack_into
_used_into = USED_ELEM.pack_into


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """Whether moving an index from ``old_idx`` to ``new_idx`` crossed ``event_idx`` (§2.7.7).

    True iff ``event_idx`` is one of old_idx, old_idx+1, ..., new_idx-1 (mod 2^16), i.e. the
    other side asked to be told once the entry at ``event_idx`` was written. All three are
    free-running u16 counters, so the test is done on distances from ``new_idx``: the entries
    written since the last decision are the ``new - old`` ones just behind ``new``, and
    ``event_idx`` is among them iff it is less than that many steps behind ``new`` (distance
    ``new - event - 1``, 0 for the newest). Masking both distances to 16 bits makes this right
    across the 65535 -> 0 wrap, provided fewer than 2^16 entries pass between decisions.
    """
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


class Virtqueue(Protocol):
    """What the connection and queue workers need of a virtqueue (a C twin implements it too)."""

    @property
    def size(self) -> int: ...
    @property
    def next_avail_idx(self) -> int: ...
    @property
    def used_idx(self) -> int: ...
    @property
    def in_flight(self) -> int: ...
    def pop(self) -> DescriptorChain | None: ...
    def push_used(self, head: int, length: int) -> None: ...
    def should_notify(self) -> bool: ...
    def enable_notifications(self) -> bool: ...
    def disable_notifications(self) -> None: ...


def _memory_spans(memory: GuestMemory) -> tuple[list[int], list[int]]:
    """Guest memory as sorted, maximal runs of contiguous regions: (starts, ends)."""
    starts: list[int] = []
    ends: list[int] = []
    for region in sorted(memory.regions, key=lambda r: r.guest_phys_addr):
        start, end = region.guest_phys_addr, region.guest_phys_addr + region.memory_size
        if ends and ends[-1] == start:
            ends[-1] = end
        else:
            starts.append(start)
            ends.append(end)
    return starts, ends


class SplitVirtqueue:
    """The device side of one split virtqueue in ``memory``. Not thread-safe: one worker owns it.

    ``desc_gpa``, ``avail_gpa`` and ``used_gpa`` are guest physical addresses. Each part must be
    aligned (16/2/4 bytes, §2.7.1) and lie wholly in one memory region, event fields included,
    else :class:`GuestFault` (misaligned) or ``GuestMemoryError`` (not mapped). ``used_idx=None``
    reads the current used->idx from memory (a backend taking over a running ring); afterwards
    the queue keeps its own copy and never reads used->idx again.
    """

    __slots__ = (
        "_avail",
        "_avail_event_off",
        "_desc",
        "_event_idx",
        "_fence",
        "_in_flight",
        "_indirect_limit",
        "_mask",
        "_memory",
        "_next_avail",
        "_region_ends",
        "_region_starts",
        "_shadow_avail",
        "_signalled_used",
        "_signalled_valid",
        "_size",
        "_span_ends",
        "_span_starts",
        "_used",
        "_used_event_off",
        "_used_idx",
    )

    def __init__(
        self,
        memory: GuestMemory,
        size: int,
        desc_gpa: int,
        avail_gpa: int,
        used_gpa: int,
        *,
        event_idx: bool,
        next_avail_idx: int = 0,
        used_idx: int | None = None,
    ) -> None:
        if type(size) is not int or not 1 <= size <= MAX_QUEUE_SIZE or size & (size - 1):
            raise ValueError(f"queue size {size!r} is not a power of two in 1..{MAX_QUEUE_SIZE}")
        if not 0 <= next_avail_idx <= 0xFFFF:
            raise ValueError(f"next_avail_idx {next_avail_idx} is not a u16")
        if used_idx is not None and not 0 <= used_idx <= 0xFFFF:
            raise ValueError(f"used_idx {used_idx} is not a u16")
        for what, gpa, align in (
            ("descriptor table", desc_gpa, 16),
            ("available ring", avail_gpa, 2),
            ("used ring", used_gpa, 4),
        ):
            if gpa % align:
                raise GuestFault(f"{what} at {gpa:#x} is not {align}-byte aligned")
        self._memory = memory
        self._size = size
        self._mask = size - 1
        self._event_idx = event_idx
        # Views over each part, taken once: the hot path then unpacks straight from the
        # mapping. They also keep the regions mapped while this queue exists, even if the
        # memory is closed under it (see memory.guest_memory on deferred unmapping).
        self._desc = memory.view(desc_gpa, 16 * size)
        self._avail = memory.view(avail_gpa, 6 + 2 * size)
        self._used = memory.view(used_gpa, 6 + 8 * size, writable=True)
        self._used_event_off = 4 + 2 * size  # avail->ring[size] (§2.7.6)
        self._avail_event_off = 4 + 8 * size  # used->ring[size] (§2.7.8)
        self._indirect_limit = max(size, MIN_INDIRECT_LIMIT)
        self._span_starts, self._span_ends = _memory_spans(memory)
        regions = sorted(memory.regions, key=lambda r: r.guest_phys_addr)
        self._region_starts = [r.guest_phys_addr for r in regions]
        self._region_ends = [r.guest_phys_addr + r.memory_size for r in regions]
        self._next_avail = next_avail_idx
        self._shadow_avail = next_avail_idx
        self._used_idx = _u16_from(self._used, 2)[0] if used_idx is None else used_idx
        # Nothing is known about what the driver was last told (a fresh start, or a ring
        # taken over after a reconnect whose last interrupt may have been lost): the first
        # notification decision says yes. Spurious interrupts are harmless, lost ones hang.
        self._signalled_used = self._used_idx
        self._signalled_valid = False
        self._in_flight = 0
        self._fence = threading.Lock()

    # -- state ----------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    @property
    def next_avail_idx(self) -> int:
        """Free-running u16 index of the next avail entry to pop (what GET_VRING_BASE returns)."""
        return self._next_avail

    @property
    def used_idx(self) -> int:
        """Free-running u16 index of the next used entry to write."""
        return self._used_idx

    @property
    def in_flight(self) -> int:
        """Chains popped and not yet pushed back."""
        return self._in_flight

    @property
    def indirect_limit(self) -> int:
        """Most descriptors an indirect table may hold."""
        return self._indirect_limit

    def __repr__(self) -> str:
        return (
            f"<SplitVirtqueue size={self._size} next_avail={self._next_avail} "
            f"used={self._used_idx} in_flight={self._in_flight}>"
        )

    # -- available ring -------------------------------------------------------------------

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None when the driver has made nothing new available.

        Raises :class:`GuestFault` when avail->idx claims more than a full ring of new entries
        (the driver broke the ring: stop the queue).
        """
        next_avail = self._next_avail
        if next_avail == self._shadow_avail:
            avail_idx = _u16_from(self._avail, 2)[0]
            # u16 free-running indices: how far ahead the driver is, across the 65535 -> 0 wrap.
            pending = (avail_idx - next_avail) & 0xFFFF
            if pending == 0:
                return None
            if pending > self._size:
                raise GuestFault(
                    f"avail->idx {avail_idx} is {pending} entries past {next_avail}, "
                    f"more than the queue size {self._size}"
                )
            self._shadow_avail = avail_idx
            # Read barrier (§2.7.13.3): the driver wrote the ring entries and descriptors
            # before avail->idx (with a write barrier); we must load them after loading
            # avail->idx. Free on x86 (loads are not reordered with loads).
        head = _u16_from(self._avail, 4 + 2 * (next_avail & self._mask))[0]
        self._next_avail = (next_avail + 1) & 0xFFFF
        self._in_flight += 1
        return self._walk(head)

    def _walk(self, head: int) -> DescriptorChain:
        size = self._size
        if head >= size:
            return _broken(head, [], f"head index {head} is not below the queue size {size}")
        descriptors: list[Descriptor] = []
        fault: GuestFault | None = None
        seen_writable = False
        total = 0
        table: memoryview | bytes = self._desc
        limit = size
        index = head
        visited = 0
        span_starts = self._span_starts
        span_ends = self._span_ends
        while True:
            addr, length, flags, next_index = _desc_from(table, 16 * index)
            visited += 1
            if flags & VIRTQ_DESC_F_INDIRECT:
                # §2.7.5.3: zero or more direct descriptors may precede one indirect one,
                # which must end the direct chain and not sit inside a table.
                if table is not self._desc:
                    return _broken(
                        head, descriptors, f"nested indirect descriptor at {index}", fault
                    )
                if flags & VIRTQ_DESC_F_NEXT:
                    return _broken(
                        head, descriptors, f"descriptor {index}: INDIRECT with NEXT", fault
                    )
                count, rem = divmod(length, 16)
                if rem or not 0 < count <= self._indirect_limit:
                    return _broken(
                        head,
                        descriptors,
                        f"indirect table length {length} is not 16 * (1..{self._indirect_limit})",
                        fault,
                    )
                copied = self._read_table(addr, length)
                if copied is None:
                    return _broken(
                        head,
                        descriptors,
                        f"indirect table {addr:#x}+{length:#x} not in memory",
                        fault,
                    )
                # The WRITE flag of the descriptor naming the table is ignored (§2.7.5.3.2).
                table, limit, index, visited = copied, count, 0, 0
                continue
            writable = bool(flags & VIRTQ_DESC_F_WRITE)
            if fault is None:
                total += length
                if writable:
                    seen_writable = True
                elif seen_writable:
                    # §2.7.4.2: the driver MUST place device-writable descriptors after all
                    # device-readable ones.
                    fault = GuestFault(f"descriptor {index}: device-readable after writable")
                if fault is not None:
                    pass
                elif length == 0:
                    # QEMU and libvhost-user refuse zero-sized buffers too.
                    fault = GuestFault(f"descriptor {index}: zero-length buffer")
                elif total > _U32_MAX:
                    # §2.7.5.2: chains are at most 4 GiB; used->len could not express more.
                    fault = GuestFault("chain is longer than 4 GiB - 1 bytes in total")
                else:
                    # Within one run of contiguous regions; also rules out addr+len > 2^64.
                    i = bisect_right(span_starts, addr) - 1
                    if i < 0 or addr + length > span_ends[i]:
                        fault = GuestFault(
                            f"descriptor {index}: buffer {addr:#x}+{length:#x} is not guest memory"
                        )
            descriptors.append(Descriptor(addr, length, writable))
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            if next_index >= limit:
                return _broken(
                    head, descriptors, f"next index {next_index} is not below {limit}", fault
                )
            if visited >= limit:
                # A loop-free chain visits each of the `limit` slots at most once.
                return _broken(
                    head, descriptors, f"descriptor chain loops (over {limit} long)", fault
                )
            index = next_index
        return DescriptorChain(head, tuple(descriptors), fault, True)

    def _read_table(self, gpa: int, length: int) -> bytes | None:
        """A copy of an indirect table, or None if it is not wholly guest memory."""
        i = bisect_right(self._span_starts, gpa) - 1
        if i < 0 or gpa + length > self._span_ends[i]:
            return None
        try:
            try:
                return self._memory.read_at(gpa, length)
            except GuestMemoryError:
                pass
            # The table runs across adjacent regions: copy it piecewise.
            out = bytearray()
            starts, ends = self._region_starts, self._region_ends
            while length:
                n = min(length, ends[bisect_right(starts, gpa) - 1] - gpa)
                out += self._memory.read_at(gpa, n)
                gpa += n
                length -= n
            return bytes(out)
        except GuestMemoryError:  # the memory was closed under us
            return None

    # -- used ring ------------------------------------------------------------------------

    def push_used(self, head: int, length: int) -> None:
        """Return chain ``head`` to the driver, ``length`` bytes written into its buffers."""
        if not (0 <= head <= _U32_MAX and 0 <= length <= _U32_MAX):
            raise ValueError(f"used element ({head}, {length}) does not fit u32 fields")
        used_idx = self._used_idx
        _used_into(self._used, 4 + 8 * (used_idx & self._mask), head, length)
        # Write barrier (§2.7.8.2: the device MUST set len before updating used->idx): the
        # element must be visible before the index that publishes it. Free on x86.
        used_idx = (used_idx + 1) & 0xFFFF
        _u16_into(self._used, 2, used_idx)
        self._used_idx = used_idx
        if self._in_flight:
            self._in_flight -= 1

    def should_notify(self) -> bool:
        """Whether to signal the call fd for what was pushed since the last decision (§2.7.7.2).

        Call after a batch of :meth:`push_used`. Each call is a decision: a later call only
        considers entries pushed after it.
        """
        # Full barrier: our used->idx store must be visible before we load used_event /
        # avail->flags. Otherwise the driver can re-enable interrupts and re-check used->idx
        # (still old to it) while we read the old used_event / NO_INTERRUPT: it sleeps
        # waiting for an interrupt we decided not to send. The device-side mirror of the
        # driver's rule in §2.7.13.4.1.
        self._full_barrier()
        new = self._used_idx
        old = self._signalled_used
        valid = self._signalled_valid
        self._signalled_used = new
        self._signalled_valid = True
        if not valid:
            return True
        if self._event_idx:
            used_event = _u16_from(self._avail, self._used_event_off)[0]
            return vring_need_event(used_event, new, old)
        if new == old:
            return False
        return not _u16_from(self._avail, 0)[0] & VIRTQ_AVAIL_F_NO_INTERRUPT

    # -- available buffer notifications (§2.7.10) -----------------------------------------

    def disable_notifications(self) -> None:
        """Ask the driver not to kick (a hint: it may kick anyway)."""
        if not self._event_idx:
            _u16_into(self._used, 0, VIRTQ_USED_F_NO_NOTIFY)
        # With EVENT_IDX there is nothing to write: avail_event stays where the last
        # enable_notifications put it, so the driver kicks once when it passes that index
        # and not again (§2.7.10); flags MUST stay 0 (§2.7.10.2).

    def enable_notifications(self) -> bool:
        """Ask the driver to kick on its next buffer; True if buffers are already available.

        When True the caller must pop again: the driver may have added them while
        notifications were off and will not kick for them.
        """
        if self._event_idx:
            # Kick me when you write the entry at next_avail, i.e. the first one I haven't seen.
            _u16_into(self._used, self._avail_event_off, self._next_avail)
        else:
            _u16_into(self._used, 0, 0)
        # Full barrier: the store above must be visible before we load avail->idx. Otherwise
        # the driver can publish a buffer and read the old flags/avail_event (no kick) while
        # we read the old avail->idx (nothing to do): a request stranded until the next kick
        # (§2.7.10, the mirror of the note in §2.7.14).
        self._full_barrier()
        return bool(_u16_from(self._avail, 2)[0] != self._next_avail)

    def _full_barrier(self) -> None:
        """A store-load fence: see the module docstring for why a lock round trip is one."""
        self._fence.acquire()
        self._fence.release()


def _broken(
    head: int, walked: list[Descriptor], message: str, earlier: GuestFault | None = None
) -> DescriptorChain:
    """A chain whose structure is broken: what was walked, and no promise of more."""
    fault = GuestFault(message if earlier is None else f"{message} (after: {earlier})")
    return DescriptorChain(head, tuple(walked), fault, False)
