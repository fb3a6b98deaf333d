"""Split virtqueues, device (backend) side: virtio 1.2 §2.7.

A :class:`SplitVirtqueue` turns the guest's available ring into :class:`DescriptorChain` values
and returns finished chains through the used ring. It trusts nothing in guest memory:

- Ring-level nonsense (avail->idx more than a queue's worth ahead of us) raises
  :class:`GuestFault` from :meth:`SplitVirtqueue.pop`; the caller stops the queue.
- Chain-level nonsense never raises: the chain comes back with ``fault`` set (see
  ``vhost_user.ring.chain``). Structural faults (bad index, loop, malformed indirect table) end the
  walk (``complete=False``); buffer faults (outside guest memory, zero length, readable after
  writable, more than 4 GiB - 1 in total) are recorded and the walk goes on (``complete=True``).
- Every walk is bounded: at most ``size`` descriptors of the descriptor table, then at most one
  indirect table of at most ``max(size, 1024)`` descriptors (``indirect_limit``). The spec
  forbids chains longer than the queue (§2.7.5.3.1); the 1024 floor tolerates drivers whose
  indirect tables follow a ``seg_max`` sized for a larger queue (QEMU caps a chain at 1024
  buffers too), while keeping a hostile pop cheap.
- Each descriptor is read exactly once (indirect tables are copied out first), so a guest
  rewriting descriptors under us cannot make what we checked differ from what we return.

Memory ordering and single accesses. The guest driver runs on other CPUs, so the order of our
loads and stores to the rings matters, and no index or event field may be torn. Every access to
a field the driver reads or writes concurrently (avail->flags/idx, used_event, used->flags/idx,
avail_event) goes through ``memory.shared.words`` views: one aligned load or store each. Its
docstring states the rule, why ``struct.pack_into`` breaks it, and the barriers: read and write
barriers (§2.7.13) are free on x86-64 and marked below where a C twin needs
``__atomic_thread_fence``; the full (store-load) barrier is ``memory.shared.full_fence``.
Used elements are written before the used->idx store that publishes them (§2.7.8.2), so their
stores need no such care, but they are single 4-byte stores too.

Alignment: the constructor checks each part's guest alignment (§2.7: 16, 2, 4 bytes) and, as a
front-end's unaligned mmap offset could break the link, its host alignment as well.
"""

from __future__ import annotations

import struct
from bisect import bisect_right
from collections import deque
from typing import Final

from memory import GuestMemory, GuestMemoryError
from memory.shared import full_fence, words
from vhost_user.errors import GuestFault
from vhost_user.ring.chain import Descriptor, DescriptorChain
from vhost_user.ring.inflight import QueueInflight

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
_desc_from = DESC.unpack_from

# Field positions in the ``words`` views (item index = byte offset / item size).
_FLAGS: Final = 0  # avail->flags / used->flags, offset 0
_IDX: Final = 1  # avail->idx / used->idx, offset 2
_RING: Final = 2  # avail->ring[0], offset 4 (u16 items); used->ring[0].id is u32 item 1


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
        "_avail_event",
        "_avail_gpa",
        "_desc",
        "_desc_gpa",
        "_event_idx",
        "_in_flight",
        "_indirect_limit",
        "_inflight",
        "_mask",
        "_memory",
        "_next_avail",
        "_region_ends",
        "_region_starts",
        "_resubmit",
        "_shadow_avail",
        "_signalled_used",
        "_signalled_valid",
        "_size",
        "_span_ends",
        "_span_starts",
        "_used16",
        "_used32",
        "_used_event",
        "_used_gpa",
        "_used_idx",
        "_writes",
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
        inflight: QueueInflight | None = None,
    ) -> None:
        """``inflight``: the queue's inflight region (vhost_user.ring.inflight). The queue
        then records every pop and push there, and starts by recovering from it: the chains
        a dead backend left in flight come first out of :meth:`pop`, and the next avail index
        is recomputed (``next_avail_idx`` is what SET_VRING_BASE said, which a crash makes
        wrong)."""
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
            if not memory.host_aligned(gpa, align):
                # Only a front-end's unaligned mmap offset does this; the ring cannot be
                # accessed with single aligned stores there (memory.shared), so refuse it.
                raise GuestFault(
                    f"{what} at {gpa:#x} lies at a host address that is not {align}-byte "
                    "aligned (the front-end's mmap offset for its region is unaligned)"
                )
        self._memory = memory
        self._size = size
        self._mask = size - 1
        self._event_idx = event_idx
        # Views over each part, taken once: the hot path then unpacks straight from the
        # mapping. They also keep the regions mapped while this queue exists, even if the
        # memory is closed under it (see memory.guest_memory on deferred unmapping).
        self._desc = memory.view(desc_gpa, 16 * size)
        self._desc_gpa, self._avail_gpa = desc_gpa, avail_gpa
        self._avail = words(memory.view(avail_gpa, 6 + 2 * size), "H")
        used = memory.view(used_gpa, 6 + 8 * size, writable=True)
        # Stores through a writable view are ours to report to the write choke point, by
        # guest address (memory.write_tracker; the dirty log of live migration marks them).
        self._writes = memory.writes
        self._used_gpa = used_gpa
        self._used16 = words(used, "H")
        self._used32 = words(used[: 4 + 8 * size], "I")
        self._used_event = _RING + size  # avail->ring[size], u16 item (§2.7.6)
        self._avail_event = 2 + 4 * size  # used->ring[size], byte offset 4 + 8 * size (§2.7.8)
        self._indirect_limit = max(size, MIN_INDIRECT_LIMIT)
        self._span_starts, self._span_ends = _memory_spans(memory)
        regions = sorted(memory.regions, key=lambda r: r.guest_phys_addr)
        self._region_starts = [r.guest_phys_addr for r in regions]
        self._region_ends = [r.guest_phys_addr + r.memory_size for r in regions]
        self._used_idx = self._used16[_IDX] if used_idx is None else used_idx
        self._inflight = inflight
        self._resubmit: deque[int] = deque()
        if inflight is not None:
            heads, next_avail_idx = inflight.recover(self._used_idx, size)
            self._resubmit.extend(heads)
        self._next_avail = next_avail_idx
        self._shadow_avail = next_avail_idx
        # Nothing is known about what the driver was last told (a fresh start, or a ring
        # taken over after a reconnect whose last interrupt may have been lost): the first
        # notification decision says yes. Spurious interrupts are harmless, lost ones hang.
        self._signalled_used = self._used_idx
        self._signalled_valid = False
        self._in_flight = 0

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

    # -- for a native data plane ---------------------------------------------------------

    def native_views(self) -> tuple[memoryview, memoryview, memoryview]:
        """The descriptor table, available ring and used ring as mapped here (for a C data
        plane that serves some chains itself, on this queue's worker thread; see
        :meth:`native_state` and :meth:`adopt`)."""
        size = self._size
        return (
            self._desc,
            self._memory.view(self._avail_gpa, 6 + 2 * size),
            self._memory.view(self._used_gpa, 6 + 8 * size, writable=True),
        )

    @property
    def event_idx(self) -> bool:
        return self._event_idx

    def native_state(self) -> tuple[int, int, int, int, bool]:
        """next_avail, the last avail->idx read, used_idx, and what the driver was last told
        (the used index of the last notification decision, and whether there was one)."""
        return (
            self._next_avail,
            self._shadow_avail,
            self._used_idx,
            self._signalled_used,
            self._signalled_valid,
        )

    def adopt(
        self,
        next_avail: int,
        shadow_avail: int,
        used_idx: int,
        signalled_used: int,
        signalled_valid: bool,
    ) -> None:
        """Take over the state a native data plane moved: it popped and pushed whole chains
        itself (so nothing it served is in flight) and made notification decisions, with the
        same rules (:meth:`should_notify`)."""
        self._next_avail = next_avail & 0xFFFF
        self._shadow_avail = shadow_avail & 0xFFFF
        self._used_idx = used_idx & 0xFFFF
        self._signalled_used = signalled_used & 0xFFFF
        self._signalled_valid = signalled_valid

    @property
    def inflight_region(self) -> QueueInflight | None:
        return self._inflight

    @property
    def resubmitting(self) -> bool:
        """Chains a dead backend left are still to come out of :meth:`pop` first."""
        return bool(self._resubmit)

    # -- available ring -------------------------------------------------------------------

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None when the driver has made nothing new available.

        Raises :class:`GuestFault` when avail->idx claims more than a full ring of new entries
        (the driver broke the ring: stop the queue).
        """
        if self._resubmit:
            # A dead backend's requests, in the order it popped them (already marked).
            self._in_flight += 1
            chain = self._walk(self._resubmit.popleft())
            return DescriptorChain(chain.head, chain.descriptors, chain.fault, chain.complete, True)
        next_avail = self._next_avail
        if next_avail == self._shadow_avail:
            avail_idx = self._avail[_IDX]
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
        head = self._avail[_RING + (next_avail & self._mask)]
        self._next_avail = (next_avail + 1) & 0xFFFF
        self._in_flight += 1
        if self._inflight is not None and head < self._size:
            # Recorded before the request is served: a backend that dies from here on leaves
            # it for the next one to resubmit. (A head past the queue is a broken chain that
            # _walk refuses; it completes with nothing to track.)
            self._inflight.popped(head)
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
        inflight = self._inflight
        if inflight is not None:
            inflight.publishing(head)
        used_idx = self._used_idx
        elem = 1 + 2 * (used_idx & self._mask)  # u32 item of used->ring[i].id
        used32 = self._used32
        used32[elem] = head
        used32[elem + 1] = length
        writes = self._writes
        if writes.active:
            writes.note(self._used_gpa + 4 * elem, 8)
        # Write barrier (§2.7.8.2: the device MUST set len before updating used->idx): the
        # element must be visible before the index that publishes it. Free on x86.
        used_idx = (used_idx + 1) & 0xFFFF
        self._used16[_IDX] = used_idx
        self._used_idx = used_idx
        if writes.active:
            writes.note(self._used_gpa + 2 * _IDX, 2)
        if inflight is not None and head < self._size:
            inflight.published(head, used_idx)
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
        full_fence()
        new = self._used_idx
        old = self._signalled_used
        valid = self._signalled_valid
        self._signalled_used = new
        self._signalled_valid = True
        if not valid:
            return True
        if self._event_idx:
            used_event = self._avail[self._used_event]
            return vring_need_event(used_event, new, old)
        if new == old:
            return False
        return not self._avail[_FLAGS] & VIRTQ_AVAIL_F_NO_INTERRUPT

    # -- available buffer notifications (§2.7.10) -----------------------------------------

    def disable_notifications(self) -> None:
        """Ask the driver not to kick (a hint: it may kick anyway)."""
        if not self._event_idx:
            self._used16[_FLAGS] = VIRTQ_USED_F_NO_NOTIFY
            if self._writes.active:
                self._writes.note(self._used_gpa, 2)
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
            self._used16[self._avail_event] = self._next_avail
            where = 2 * self._avail_event
        else:
            self._used16[_FLAGS] = 0
            where = 0
        if self._writes.active:
            self._writes.note(self._used_gpa + where, 2)
        # Full barrier: the store above must be visible before we load avail->idx. Otherwise
        # the driver can publish a buffer and read the old flags/avail_event (no kick) while
        # we read the old avail->idx (nothing to do): a request stranded until the next kick
        # (§2.7.10, the mirror of the note in §2.7.14).
        full_fence()
        return bool(self._avail[_IDX] != self._next_avail)


def _broken(
    head: int, walked: list[Descriptor], message: str, earlier: GuestFault | None = None
) -> DescriptorChain:
    """A chain whose structure is broken: what was walked, and no promise of more."""
    fault = GuestFault(message if earlier is None else f"{message} (after: {earlier})")
    return DescriptorChain(head, tuple(walked), fault, False)
