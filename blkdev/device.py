"""BlkDevice: a virtio-blk device (virtio 1.2 section 5.2) over a Disk, for vhost_user.

Each request is parsed by the pure functions of :mod:`blkdev.virtio_blk`, executed on the
disk, and answered with a status byte. Nothing the guest puts in a chain makes
:meth:`BlkDevice.handle_chain` raise: bad requests get IOERR or UNSUPP, local I/O failures
IOERR.

Used lengths (2.7.8): the device reports the bytes it wrote into the chain's writable part,
data plus the status byte (an IN of 4096 bytes: 4097; a failed request: 1). A chain the ring
walker flagged as faulty gets 0, with IOERR written to its status byte when that byte is
reachable.

Cache mode: ``writeback`` (config space, 5.2.4) starts at 1. The device is write-through when
the driver sets it to 0 or did not negotiate VIRTIO_BLK_F_FLUSH ("if VIRTIO_BLK_F_FLUSH is not
negotiated, the device MUST ... behave as write-through", 5.2.5/5.2.6.2): every write is
then followed by a flush before its status is reported. The driver's choice is kept across
renegotiations (backend reconnections), since QEMU does not replay it.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Final

import structlog

from blkdev import fastpath
from blkdev import virtio_blk as vb
from blkdev.disks.disk import AsyncDisk, Disk
from blkdev.disks.handle import DiskHandle
from blkdev.errors import BlkdevError
from blkdev.stats import DeviceStats, RequestType, request_type
from memory import AccessError, GuestMemory, GuestMemoryError, request_buffers_from_buffers
from vhost_user.device import Completion
from vhost_user.ring.chain import DescriptorChain
from vhost_user.ring.features import (
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
)
from vhost_user.ring.split import SplitVirtqueue
from vhost_user.ring.virtqueue import Virtqueue

log = structlog.get_logger(__name__)

CONFIG_SPACE_LIMIT: Final = 4096
MAX_DISCARD_SEGMENTS: Final = 256
#: Largest DISCARD / WRITE_ZEROES request, all its segments together (see
#: ``virtio_blk.decode_segments``): INT_MAX bytes rounded down to sectors, as QEMU.
MAX_DWZ_SECTORS: Final = (2**31 - 1) // vb.SECTOR_SIZE
SIZE_MAX: Final = 1 << 20
IO_THREADS: Final = 4
POLL_US: Final = 32
"""Default busy-polling of a busy queue's available ring by the C data plane, in microseconds
(qemu-storage-daemon's iothreads poll up to 32 us by default)."""
"""Default I/O threads per queue: how many of a queue's requests wait for storage at once."""

# What a request may fail with, all local or guest-memory problems: answered with IOERR.
_IO_FAILURES: Final = (BlkdevError, OSError, AccessError, GuestMemoryError)


def _log_resubmitted(
    queue_index: int, chain: DescriptorChain, kind: RequestType, status: int
) -> None:
    """Once per request a dead backend left in flight: rare, and what an operator checking a
    restart wants to see."""
    if chain.resubmitted:
        log.info(
            "resubmitted request served",
            queue=queue_index,
            head=chain.head,
            type=kind.name.lower(),
            status=status,
        )


class _MustWait(Exception):
    """Serving the request inline would wait for storage: hand it to an I/O thread."""


class _FastPath:
    """``vhost_user.device.FastPath`` over ``blkdev.fastpath``: the device's current limits
    (capacity, read-only, write-through) passed at every call, as they can change."""

    def __init__(self, device: BlkDevice, fast: fastpath.FastPath) -> None:
        self._device = device
        self._fast = fast

    def serve(self, budget: int) -> tuple[int, bool, bool]:
        d = self._device
        limits = d._limits
        return self._fast.serve(
            budget,
            capacity_sectors=limits.capacity_sectors,
            punt_writes=limits.read_only or not d._writeback,
            poll_ns=d._poll_ns,
        )

    def close(self) -> None:
        self._fast.close()


class BlkDevice:
    """A virtio-blk device serving ``disk``; implements ``vhost_user.device.VhostUserDevice``.

    ``seg_max`` (data descriptors per request) defaults to ``min(queue_size, 128) - 2``: the
    driver may build indirect chains of seg_max + 2 descriptors and no chain may be longer than
    the queue the front-end actually sets up (2.7.5.3.1), which can be smaller than
    ``queue_size`` (QEMU's vhost-user-blk default is 128).
    """

    def __init__(
        self,
        disk: Disk,
        *,
        num_queues: int = 1,
        serial: str | bytes = "",
        read_only: bool = False,
        queue_size: int = 1024,
        seg_max: int | None = None,
        io_threads: int = IO_THREADS,
        data_plane: str = "c",
        poll_us: int = POLL_US,
    ) -> None:
        """``data_plane``: ``c`` serves plain reads and writes of a raw image in C where the
        module is built (``blkdev.fastpath``), ``python`` serves everything in Python."""
        if not 1 <= num_queues <= 0xFFFF:
            raise ValueError(f"num_queues must be 1..65535, not {num_queues}")
        if not 2 <= queue_size <= 32768 or queue_size & (queue_size - 1):
            raise ValueError(f"queue_size must be a power of two in 2..32768, not {queue_size}")
        if seg_max is None:
            seg_max = min(queue_size, 128) - 2
        if not 1 <= seg_max <= queue_size - 2:
            raise ValueError(f"seg_max must be 1..queue_size-2, not {seg_max}")
        if not 0 <= io_threads <= 1024:
            raise ValueError(f"io_threads must be 0..1024, not {io_threads}")
        if data_plane not in ("c", "python"):
            raise ValueError(f"data_plane must be c or python, not {data_plane!r}")
        self._data_plane = data_plane
        if not 0 <= poll_us <= 1_000_000:
            raise ValueError(f"poll_us must be 0..1000000, not {poll_us}")
        self._poll_ns = poll_us * 1000
        self._disk = disk
        self._num_queues = num_queues
        self._queue_size = queue_size
        self._read_only = read_only or disk.read_only
        self._id = vb.id_bytes(serial)
        self._discard = disk.supports_discard and not self._read_only
        self._write_zeroes = disk.supports_write_zeroes and not self._read_only
        granularity = disk.discard_granularity
        self._config = vb.BlkConfig(
            capacity=disk.size // vb.SECTOR_SIZE,
            size_max=SIZE_MAX,
            seg_max=seg_max,
            blk_size=vb.SECTOR_SIZE,
            # 4 KiB physical blocks: guests then align and size their I/O to 4 KiB, which
            # keeps O_DIRECT and qcow2 clusters on their fast path.
            physical_block_exp=3,
            min_io_size=8,
            writeback=1,
            num_queues=num_queues,
            max_discard_sectors=MAX_DWZ_SECTORS if self._discard else 0,
            max_discard_seg=MAX_DISCARD_SEGMENTS if self._discard else 0,
            discard_sector_alignment=max(1, granularity // vb.SECTOR_SIZE) if self._discard else 0,
            max_write_zeroes_sectors=MAX_DWZ_SECTORS if self._write_zeroes else 0,
            max_write_zeroes_seg=MAX_DISCARD_SEGMENTS if self._write_zeroes else 0,
            write_zeroes_may_unmap=1 if self._write_zeroes else 0,
        )
        self._state_lock = threading.Lock()
        self._acked = self.device_features()
        self._limits = self._make_limits(self._acked)
        # The cache mode the driver chose (config ``writeback``), and the one in force: it also
        # needs FLUSH negotiated. The choice outlives set_acked_features, i.e. a reconnection:
        # QEMU keeps the config it last read and wrote across backend reconnects and the
        # guest is not told again, so forgetting a write-through choice would silently turn
        # the guest's writes volatile.
        self._wce = True
        self._writeback = True
        #: Per-queue request statistics (``blkdev.stats``), for the control socket and metrics.
        self.stats = DeviceStats(num_queues)
        self._io_threads = io_threads
        # Per queue, created on its first request that must wait: a queue's slow requests
        # then never hold up another queue's.
        self._pools: list[ThreadPoolExecutor | None] = [None] * num_queues
        self._pools_lock = threading.Lock()

    # -- VhostUserDevice -------------------------------------------------------------------

    @property
    def num_queues(self) -> int:
        return self._num_queues

    @property
    def max_queue_size(self) -> int:
        return self._queue_size

    @property
    def read_only(self) -> bool:
        return self._read_only

    def device_features(self) -> int:
        bits = [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_RING_F_EVENT_IDX,
            vb.VIRTIO_BLK_F_SIZE_MAX,
            vb.VIRTIO_BLK_F_SEG_MAX,
            vb.VIRTIO_BLK_F_BLK_SIZE,
            vb.VIRTIO_BLK_F_FLUSH,
            vb.VIRTIO_BLK_F_TOPOLOGY,
            vb.VIRTIO_BLK_F_CONFIG_WCE,
            vb.VIRTIO_BLK_F_MQ,
        ]
        if self._discard:
            bits.append(vb.VIRTIO_BLK_F_DISCARD)
        if self._write_zeroes:
            bits.append(vb.VIRTIO_BLK_F_WRITE_ZEROES)
        if self._read_only:
            bits.append(vb.VIRTIO_BLK_F_RO)
        return sum(1 << b for b in bits)

    def set_acked_features(self, features: int) -> None:
        with self._state_lock:
            self._acked = features & self.device_features()
            self._limits = self._make_limits(self._acked)
            was = self._set_writeback(self._wce)
        if was and not self._writeback:
            self._flush_logged("cache mode change to write-through")

    def read_config(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0 or offset + size > CONFIG_SPACE_LIMIT:
            raise ValueError(f"config access {offset}+{size} outside the config space")
        with self._state_lock:
            raw = self._config_bytes()
        return raw[offset : offset + size].ljust(size, b"\0")

    def write_config(self, offset: int, data: bytes) -> None:
        if offset < 0 or offset + len(data) > CONFIG_SPACE_LIMIT:
            raise ValueError(f"config write {offset}+{len(data)} outside the config space")
        index = vb.CONFIG_WRITEBACK_OFFSET - offset
        if not 0 <= index < len(data):
            return
        with self._state_lock:
            if not self._acked & (1 << vb.VIRTIO_BLK_F_CONFIG_WCE):
                return
            was = self._set_writeback(bool(data[index]))
        if was and not self._writeback:
            # Writes completed while the cache was on are not durable yet; make them so
            # before we start promising write-through.
            self._flush_logged("cache mode change to write-through")

    @property
    def inflight_state_size(self) -> int:
        return self._disk.journal_size

    def attach_inflight_state(self, region: memoryview | None) -> None:
        """The disk's journal lives there (``blkdev.disks.qcow.journal``)."""
        try:
            self._disk.attach_journal(region)
        except Exception:
            log.exception("attaching the disk's journal failed")

    def release(self) -> None:
        """Migrated away: hand the image over (``blkdev.disks.handle``); quiesce has flushed."""
        if isinstance(self._disk, DiskHandle):
            try:
                self._disk.release()
            except Exception:
                log.exception("releasing the image failed")

    def acquire(self) -> None:
        if isinstance(self._disk, DiskHandle):
            self._disk.acquire()

    def quiesce(self) -> None:
        self._flush_logged("quiesce")

    def submit_chain(
        self, queue_index: int, memory: GuestMemory, chain: DescriptorChain, complete: Completion
    ) -> None:
        """Serve the request on the queue's thread if it needs no wait for storage (a read
        the page cache holds, a buffered write, GET_ID, anything refused), else on one of the
        queue's I/O threads; completions come back in whatever order they finish.

        FLUSH needs nothing more: it runs when every write completed before it was submitted
        has returned from the kernel, so its fdatasync covers them (virtio 5.2.6: a flush
        covers the writes *completed* before it, not those still in flight)."""
        aio = self._disk.aio
        if aio is not None:
            self._submit_async(aio, queue_index, memory, chain, complete)
            return
        if self._io_threads == 0:
            complete(self.handle_chain(queue_index, memory, chain))
            return
        if self._disk.cached_io:
            length = self._handle(queue_index, memory, chain, inline=True)
            if length is not None:
                complete(length)
                return
        self._pool(queue_index).submit(self._run, queue_index, memory, chain, complete)

    def _submit_async(
        self,
        aio: AsyncDisk,
        queue_index: int,
        memory: GuestMemory,
        chain: DescriptorChain,
        complete: Completion,
    ) -> None:
        """A disk with an asynchronous interface (RBD): start the request's I/O and return;
        its completion (on the disk's thread) writes the status and completes the chain.
        Everything that needs no I/O (faults, refusals, GET_ID) is answered at once, as
        :meth:`_serve` answers it."""
        if chain.fault is not None:
            complete(self.handle_chain(queue_index, memory, chain))
            return
        layout = vb.split_chain(chain.descriptors)
        status_gpa = layout.status
        if status_gpa is None or layout.header_length < vb.REQUEST_HEADER.size:
            complete(self.handle_chain(queue_index, memory, chain))
            return
        limits = self._limits
        try:
            header = vb.decode_header(self._read(memory, layout.header))
        except _IO_FAILURES:
            complete(self.handle_chain(queue_index, memory, chain))
            return
        plan = vb.plan_request(header, layout, limits)
        if isinstance(plan, vb.ReadSegments):
            self._submit_ranges(aio, queue_index, memory, chain, plan, status_gpa, complete)
            return
        if (
            not isinstance(plan, vb.Read | vb.Write | vb.Flush)
            or (isinstance(plan, vb.Read | vb.Write) and not plan.length)
            or (isinstance(plan, vb.Flush) and self._read_only)
        ):
            # GET_ID, refusals, empty transfers, a read-only flush: nothing to wait for.
            complete(self.handle_chain(queue_index, memory, chain))
            return
        stats = self.stats.queues[queue_index]
        started = stats.begin()
        kind = request_type(header.type)

        def finish(result: int, data_bytes: int, written: int) -> None:
            status = vb.VIRTIO_BLK_S_OK if result >= 0 else vb.VIRTIO_BLK_S_IOERR
            if result < 0:
                log.debug("request failed", error=os.strerror(-result), type=kind.name.lower())
            stats.end(started, kind, status, data_bytes if result >= 0 else 0)
            _log_resubmitted(queue_index, chain, kind, status)
            ok = self._write_status(memory, status_gpa, status)
            complete((written if result >= 0 else 0) + 1 if ok else 0)

        try:
            if isinstance(plan, vb.Read):
                buffers = request_buffers_from_buffers(memory, list(plan.segments), True)
                n = plan.length
                aio.submit_read(plan.offset, buffers, lambda r: finish(r, n, n))
            elif isinstance(plan, vb.Write):
                buffers = request_buffers_from_buffers(memory, list(plan.segments), False)
                n = plan.length
                aio.submit_write(plan.offset, buffers, self._then_flush(aio, finish, n))
            else:
                aio.submit_flush(lambda r: finish(r, 0, 0))
        except _IO_FAILURES as e:
            log.debug("request not started", error=str(e))
            finish(-errno.EIO, 0, 0)

    def _then_flush(
        self, aio: AsyncDisk, finish: Callable[[int, int, int], None], n: int
    ) -> Callable[[int], None]:
        """A write's completion: write-through (the driver's choice, or no FLUSH negotiated)
        flushes before the request completes, as :meth:`_after_write` does for the others."""

        def written(result: int) -> None:
            if result < 0 or self._writeback:
                finish(result, n, 0)
                return
            try:
                aio.submit_flush(lambda r: finish(r, n, 0))
            except _IO_FAILURES as e:
                log.debug("flush after write not started", error=str(e))
                finish(-errno.EIO, n, 0)

        return written

    def _submit_ranges(
        self,
        aio: AsyncDisk,
        queue_index: int,
        memory: GuestMemory,
        chain: DescriptorChain,
        plan: vb.ReadSegments,
        status_gpa: int,
        complete: Completion,
    ) -> None:
        """DISCARD and WRITE_ZEROES: every segment started at once; the request completes
        when the last one does, failed if any did."""
        stats = self.stats.queues[queue_index]
        started = stats.begin()
        kind = request_type(plan.type)
        try:
            ranges = vb.decode_segments(plan.type, self._read(memory, plan.segments), self._limits)
        except _IO_FAILURES:
            ranges = vb.Fail(vb.VIRTIO_BLK_S_IOERR)
        if isinstance(ranges, vb.Fail) or not ranges:
            status = ranges.status if isinstance(ranges, vb.Fail) else vb.VIRTIO_BLK_S_OK
            stats.end(started, kind, status, 0)
            complete(1 if self._write_status(memory, status_gpa, status) else 0)
            return
        lock = threading.Lock()
        state = {"left": len(ranges), "failed": False}

        def one_done(result: int) -> None:
            with lock:
                state["left"] -= 1
                state["failed"] = state["failed"] or result < 0
                if state["left"]:
                    return
            result = -errno.EIO if state["failed"] else 0
            self._then_flush(aio, finish, 0)(result)

        def finish(result: int, _n: int, _w: int) -> None:
            status = vb.VIRTIO_BLK_S_OK if result >= 0 else vb.VIRTIO_BLK_S_IOERR
            stats.end(started, kind, status, 0)
            complete(1 if self._write_status(memory, status_gpa, status) else 0)

        for r in ranges:
            try:
                if plan.type == vb.VIRTIO_BLK_T_DISCARD:
                    aio.submit_discard(r.offset, r.length, one_done)
                else:
                    aio.submit_write_zeroes(r.offset, r.length, r.unmap, one_done)
            except _IO_FAILURES as e:
                log.debug("request not started", error=str(e))
                one_done(-errno.EIO)

    def _run(
        self, queue_index: int, memory: GuestMemory, chain: DescriptorChain, complete: Completion
    ) -> None:
        try:
            length = self.handle_chain(queue_index, memory, chain)
        except Exception:
            log.exception("device failed a request", queue=queue_index, head=chain.head)
            length = -1
        complete(length)

    def fast_path(
        self, queue_index: int, queue: Virtqueue, memory: GuestMemory
    ) -> _FastPath | None:
        """The C data plane for the queue (``blkdev.fastpath``), when chosen, built and
        possible: a split ring over a raw image."""
        if self._data_plane != "c" or not isinstance(queue, SplitVirtqueue):
            return None
        target = self._disk.fast_target()
        if target is None or not fastpath.available():
            return None
        fd, align, guard = target
        return _FastPath(
            self,
            fastpath.FastPath(
                queue,
                memory,
                fd=fd,
                direct_align=align,
                guard_sectors=guard,
                max_segs=self._config.seg_max,
                stats=self.stats.queues[queue_index],
            ),
        )

    def _pool(self, queue_index: int) -> ThreadPoolExecutor:
        pool = self._pools[queue_index]
        if pool is None:
            with self._pools_lock:
                pool = self._pools[queue_index]
                if pool is None:
                    pool = ThreadPoolExecutor(
                        self._io_threads, thread_name_prefix=f"vhost-user-blk-q{queue_index}-io"
                    )
                    self._pools[queue_index] = pool
        return pool

    def handle_chain(self, queue_index: int, memory: GuestMemory, chain: DescriptorChain) -> int:
        length = self._handle(queue_index, memory, chain, inline=False)
        assert length is not None
        return length

    def _handle(
        self, queue_index: int, memory: GuestMemory, chain: DescriptorChain, *, inline: bool
    ) -> int | None:
        """Serve one request; with ``inline``, None (and nothing done that matters) when it
        would have to wait for storage."""
        stats = self.stats.queues[queue_index]
        started = stats.begin()
        kind, status, data_bytes = RequestType.INVALID, vb.VIRTIO_BLK_S_IOERR, 0
        try:
            if chain.fault is not None:
                log.debug(
                    "guest fault in chain",
                    queue=queue_index,
                    head=chain.head,
                    fault=str(chain.fault),
                )
                # Only a complete chain's last descriptor is known to be the status buffer (the
                # last non-empty one, as split_chain sees it: a zero-length tail is the fault).
                if chain.complete:
                    status_gpa = vb.split_chain(chain.descriptors).status
                    if status_gpa is not None:
                        self._write_status(memory, status_gpa, vb.VIRTIO_BLK_S_IOERR)
                return 0
            layout = vb.split_chain(chain.descriptors)
            if layout.status is None:
                log.debug("chain has no status byte", queue=queue_index, head=chain.head)
                return 0
            try:
                kind, status, written, data_bytes = self._serve(memory, layout, inline)
                _log_resubmitted(queue_index, chain, kind, status)
            except _MustWait:
                stats.cancel()
                started = 0
                return None
            if not self._write_status(memory, layout.status, status):
                return 0
            return written + 1
        finally:
            if started:
                stats.end(started, kind, status, data_bytes)

    # -- internals -------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """The size the guest is told, in bytes (config ``capacity``)."""
        return self._config.capacity * vb.SECTOR_SIZE

    def set_capacity(self, size: int) -> bool:
        """Tell the guest ``size`` bytes (rounded down to whole sectors) from the next config
        read, and check requests against it from the next request on; True if it changed.
        The caller then sends the front-end a config change (``blkdev.resize``)."""
        sectors = size // vb.SECTOR_SIZE
        with self._state_lock:
            if sectors == self._config.capacity:
                return False
            self._config = dataclasses.replace(self._config, capacity=sectors)
            self._limits = self._make_limits(self._acked)
        log.info("capacity changed", sectors=sectors)
        return True

    def _config_bytes(self) -> bytes:
        raw = bytearray(self._config.pack())
        raw[vb.CONFIG_WRITEBACK_OFFSET] = int(self._writeback)
        return bytes(raw)

    def _set_writeback(self, wce: bool) -> bool:
        """Record the driver's choice; return whether the cache was on before. Lock held."""
        self._wce = wce
        was, self._writeback = (
            self._writeback,
            wce and bool(self._acked & (1 << vb.VIRTIO_BLK_F_FLUSH)),
        )
        return was

    def _make_limits(self, acked: int) -> vb.Limits:
        return vb.Limits(
            capacity_sectors=self._config.capacity,
            read_only=self._read_only,
            discard=self._discard and bool(acked & (1 << vb.VIRTIO_BLK_F_DISCARD)),
            max_discard_sectors=self._config.max_discard_sectors,
            max_discard_seg=self._config.max_discard_seg,
            write_zeroes=self._write_zeroes and bool(acked & (1 << vb.VIRTIO_BLK_F_WRITE_ZEROES)),
            max_write_zeroes_sectors=self._config.max_write_zeroes_sectors,
            max_write_zeroes_seg=self._config.max_write_zeroes_seg,
        )

    def _flush_logged(self, why: str) -> None:
        if self._read_only:
            return
        try:
            self._disk.flush()
        except (BlkdevError, OSError) as e:
            log.error("flush failed", reason=why, error=str(e))

    @staticmethod
    def _write_status(memory: GuestMemory, gpa: int, status: int) -> bool:
        try:
            memory.write_at(gpa, bytes((status,)))
        except (AccessError, GuestMemoryError):
            return False
        return True

    @staticmethod
    def _read(memory: GuestMemory, segments: tuple[vb.Segment, ...]) -> bytes:
        try:
            return b"".join(memory.read_at(gpa, n) for gpa, n in segments)
        except GuestMemoryError:
            # A buffer may run from one region into the next (guest-contiguous, separate
            # mappings): the paged path handles that, and faults on a real hole.
            buffers = request_buffers_from_buffers(memory, list(segments), False)
            return buffers.reader().read(len(buffers))

    @staticmethod
    def _write(memory: GuestMemory, segments: tuple[vb.Segment, ...], data: bytes) -> None:
        """Write ``data`` over ``segments`` (which hold at least that many bytes)."""
        request_buffers_from_buffers(memory, list(segments), True).writer().write(data)

    def _serve(
        self, memory: GuestMemory, layout: vb.ChainLayout, inline: bool = False
    ) -> tuple[RequestType, int, int, int]:
        """Execute one request: (its type, status, bytes written to guest memory, data bytes
        moved between disk and guest for the statistics). With ``inline``, _MustWait where
        that would wait for storage (before anything that cannot be done again)."""
        limits = self._limits
        kind = RequestType.INVALID
        try:
            if layout.header_length < vb.REQUEST_HEADER.size:
                return kind, vb.VIRTIO_BLK_S_IOERR, 0, 0
            header = vb.decode_header(self._read(memory, layout.header))
            kind = request_type(header.type)
            plan = vb.plan_request(header, layout, limits)
            if isinstance(plan, vb.Fail):
                return kind, plan.status, 0, 0
            if isinstance(plan, vb.Read):
                if plan.length:
                    buffers = request_buffers_from_buffers(memory, list(plan.segments), True)
                    if not inline:
                        self._disk.read(plan.offset, buffers)
                    elif not self._disk.read_cached(plan.offset, buffers):
                        raise _MustWait
                return kind, vb.VIRTIO_BLK_S_OK, plan.length, plan.length
            if isinstance(plan, vb.Write):
                if plan.length:
                    buffers = request_buffers_from_buffers(memory, list(plan.segments), False)
                    if not inline:
                        self._disk.write(plan.offset, buffers)
                    elif not self._writeback or not self._disk.write_cached(plan.offset, buffers):
                        raise _MustWait  # write-through flushes after each write: it waits
                    self._after_write()
                return kind, vb.VIRTIO_BLK_S_OK, 0, plan.length
            if inline and not isinstance(plan, vb.GetId):
                raise _MustWait  # FLUSH, DISCARD, WRITE_ZEROES wait for storage
            if isinstance(plan, vb.Flush):
                if not self._read_only:
                    self._disk.flush()
                return kind, vb.VIRTIO_BLK_S_OK, 0, 0
            if isinstance(plan, vb.GetId):
                self._write(memory, plan.segments, self._id[: plan.length])
                return kind, vb.VIRTIO_BLK_S_OK, plan.length, 0
            ranges = vb.decode_segments(plan.type, self._read(memory, plan.segments), limits)
            if isinstance(ranges, vb.Fail):
                return kind, ranges.status, 0, 0
            for r in ranges:
                if plan.type == vb.VIRTIO_BLK_T_DISCARD:
                    self._disk.discard(r.offset, r.length)
                else:
                    self._disk.write_zeroes(r.offset, r.length, r.unmap)
            if ranges:
                self._after_write()
            return kind, vb.VIRTIO_BLK_S_OK, 0, 0
        except _IO_FAILURES as e:
            log.debug("request failed", error=str(e))
            return kind, vb.VIRTIO_BLK_S_IOERR, 0, 0

    def _after_write(self) -> None:
        if not self._writeback:
            self._disk.flush()
