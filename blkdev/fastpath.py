"""The C data plane of a queue: plain reads and writes of a raw image served by
``native/blk_fast.c`` on the queue's worker thread, without the GIL; everything else by Python.

``BlkDevice.fast_path`` makes one per started queue when the C module is built, the data plane
is ``c`` (``serve --data-plane``) and the disk is a raw image (``Disk.fast_target``). The worker
calls :meth:`FastPath.serve` before each Python pop: C serves the chains at the head of the
available ring that are plainly valid READs and WRITEs and stops, untouched, at the first one
that is not (FLUSH, GET_ID, DISCARD, an indirect table, any fault), which the Python path then
pops and answers. Both paths keep the same ring state (the queue's indices are copied in and
adopted back around each call), the same inflight records and the same statistics. While dirty
pages are logged (a migration) the worker does not call in: every write into guest memory then
goes through Python's write choke point (``memory.write_tracker``).
"""

from __future__ import annotations

from typing import Any, Final

import structlog

from blkdev import native
from blkdev.stats import LATENCY_BOUNDS_NS, QueueStats
from memory import GuestMemory
from vhost_user.ring.split import SplitVirtqueue

log = structlog.get_logger(__name__)

MAX_REQUEST: Final = 32 << 20
"""Largest request served in C (larger ones, legal as they are, take the Python path)."""

_said_unbuilt = False


def available() -> bool:
    """Whether the C module is built (once, if not, the log says the Python path serves)."""
    global _said_unbuilt
    if native.blk_fast() is not None:
        return True
    if not _said_unbuilt:
        _said_unbuilt = True
        log.warning("the C data plane is not built (python -m blkdev.native.build): Python serves")
    return False


class FastPath:
    """The C fast path of one queue (see the module docstring)."""

    def __init__(
        self,
        queue: SplitVirtqueue,
        memory: GuestMemory,
        *,
        fd: int,
        direct_align: int,
        guard_sectors: int,
        max_segs: int,
        stats: QueueStats,
    ) -> None:
        mod = native.blk_fast()
        assert mod is not None
        self._ffi: Any = mod.ffi
        self._lib: Any = mod.lib
        ffi = self._ffi
        self._queue = queue
        self._stats = stats
        f = ffi.new("struct vub_fast *")
        self._f = f
        # Views and cdata pointers kept alive as long as the struct points into them; the
        # queue's own views keep the mappings alive for as long as it exists.
        self._keep: list[Any] = []
        regions = sorted(memory.regions, key=lambda r: r.guest_phys_addr)
        if len(regions) > 64:
            raise ValueError("more regions than the C data plane takes")
        for i, r in enumerate(regions):
            view = memory.view(r.guest_phys_addr, r.memory_size, writable=True)
            ptr = ffi.from_buffer("uint8_t[]", view)
            self._keep += [view, ptr]
            f.regions[i].gpa = r.guest_phys_addr
            f.regions[i].size = r.memory_size
            f.regions[i].host = ptr
        f.nregions = len(regions)
        for name, view in zip(("desc", "avail", "used"), queue.native_views(), strict=True):
            ptr = ffi.from_buffer("uint8_t[]", view)
            self._keep += [view, ptr]
            setattr(f, name, ptr)
        f.size = queue.size
        f.event_idx = int(queue.event_idx)
        self._inflight = queue.inflight_region
        if self._inflight is not None:
            ptr = ffi.from_buffer("uint8_t[]", self._inflight.region)
            self._keep.append(ptr)
            f.inflight = ptr
        f.fd = fd
        f.direct_align = direct_align
        f.guard_sectors = guard_sectors
        f.max_bytes = MAX_REQUEST
        f.max_segs = max_segs
        for i, bound in enumerate(LATENCY_BOUNDS_NS):
            f.lat_bounds_ns[i] = bound
        self._punt = ffi.new("int *")
        self._notify = ffi.new("int *")

    def serve(
        self, budget: int, *, capacity_sectors: int, punt_writes: bool, poll_ns: int
    ) -> tuple[int, bool, bool]:
        """Serve up to ``budget`` chains; (how many, whether the next one is Python's,
        whether the driver is to be notified now: the caller signals)."""
        queue = self._queue
        if queue.resubmitting:
            return 0, True, False  # a dead backend's chains first, through pop()
        f = self._f
        (f.next_avail, f.shadow_avail, f.used_idx, f.signalled_used, valid) = queue.native_state()
        f.signalled_valid = int(valid)
        f.capacity_sectors = capacity_sectors
        f.punt_writes = int(punt_writes)
        f.poll_ns = poll_ns
        inflight = self._inflight
        if inflight is not None:
            f.inflight_counter = inflight.counter
        served = self._lib.vub_fast_serve(f, budget, self._punt, self._notify)  # no GIL
        queue.adopt(
            f.next_avail, f.shadow_avail, f.used_idx, f.signalled_used, bool(f.signalled_valid)
        )
        if inflight is not None:
            inflight.counter = f.inflight_counter
        if served:
            self._stats.add_native(
                reads=f.reads,
                writes=f.writes,
                bytes_read=f.bytes_read,
                bytes_written=f.bytes_written,
                io_errors=f.io_errors,
                lat_sum_ns=f.lat_sum_ns,
                buckets=list(f.lat_buckets),
            )
            f.reads = f.writes = f.bytes_read = f.bytes_written = f.io_errors = 0
            f.lat_sum_ns = 0
            for i in range(len(LATENCY_BOUNDS_NS) + 1):
                f.lat_buckets[i] = 0
        return served, bool(self._punt[0]), bool(self._notify[0])

    def close(self) -> None:
        for item in reversed(self._keep):
            if isinstance(item, memoryview):
                item.release()
            else:
                self._ffi.release(item)
        self._keep.clear()
