"""Per-queue request statistics: recorded by ``BlkDevice.handle_chain``, read by the control
socket (``query-stats``) and the Prometheus metrics, which both go through :meth:`DeviceStats.
snapshot` (one bookkeeping, two views).

Per queue: requests by type, data bytes read and written, error statuses (IOERR, UNSUPP), the
requests in flight and a latency histogram with fixed, log-spaced bounds (1-2-5 per decade,
1 us to 10 s, then +Inf). Latency is the time :meth:`BlkDevice.handle_chain` takes, from the
chain popped to the status byte written: the device's own service time, not the guest's.

Counted as bytes read and written: the data of successful READ (VIRTIO_BLK_T_IN) and WRITE
(VIRTIO_BLK_T_OUT) requests. GET_ID's serial is not disk data; DISCARD and WRITE_ZEROES move
none. A chain without a readable request header (a ring fault, no status byte, a header
shorter than 16 bytes) has no type: it counts as ``invalid``, with an IOERR.

Threads. Writers take the queue's lock: a queue's requests are recorded by its worker and by
its I/O threads (``BlkDevice.submit_chain``), so ``counter += 1``, a read-modify-write, needs
it. Readers (the control and metrics threads) read racily, which is safe in CPython because
each attribute load and store and each list item load and store is atomic (under the GIL; per
object in free-threaded builds): a reader sees every counter at a value it really had, and
monotonic counters never go backwards. What a reader may see is a snapshot taken over a few
microseconds, one counter a request ahead of another; nothing here needs more (the histogram's
count is derived from its buckets, copied in one step, so it always equals their sum).
"""

from __future__ import annotations

import bisect
import enum
import threading
import time
from dataclasses import dataclass
from typing import Final

from blkdev import virtio_blk as vb


class RequestType(enum.IntEnum):
    READ = 0
    WRITE = 1
    FLUSH = 2
    DISCARD = 3
    WRITE_ZEROES = 4
    GET_ID = 5
    UNSUPPORTED = 6
    INVALID = 7


#: The names the control socket and the metrics use, indexed by :class:`RequestType`.
REQUEST_TYPE_NAMES: Final = (
    "read",
    "write",
    "flush",
    "discard",
    "write-zeroes",
    "get-id",
    "unsupported",
    "invalid",
)

_TYPE_OF_HEADER: Final = {
    vb.VIRTIO_BLK_T_IN: RequestType.READ,
    vb.VIRTIO_BLK_T_OUT: RequestType.WRITE,
    vb.VIRTIO_BLK_T_FLUSH: RequestType.FLUSH,
    vb.VIRTIO_BLK_T_DISCARD: RequestType.DISCARD,
    vb.VIRTIO_BLK_T_WRITE_ZEROES: RequestType.WRITE_ZEROES,
    vb.VIRTIO_BLK_T_GET_ID: RequestType.GET_ID,
}


def request_type(header_type: int) -> RequestType:
    """The statistics row of a request header's ``type`` (unknown types: UNSUPPORTED)."""
    return _TYPE_OF_HEADER.get(header_type, RequestType.UNSUPPORTED)


#: Upper bounds of the latency buckets, in nanoseconds: 1, 2, 5 us ... 5 s, 10 s. A request
#: of ``t`` ns falls in the first bucket whose bound is >= t; past the last, in +Inf.
LATENCY_BOUNDS_NS: Final = (
    *(mantissa * 10**exponent for exponent in range(3, 10) for mantissa in (1, 2, 5)),
    10**10,
)


class QueueStats:
    """The counters of one queue. Written under its lock (see the module docstring),
    through :meth:`begin` and :meth:`end`; read by anyone through :meth:`snapshot`."""

    __slots__ = (
        "_lock",
        "bytes_read",
        "bytes_written",
        "in_flight",
        "io_errors",
        "latency_buckets",
        "latency_sum_ns",
        "requests",
        "unsupported_errors",
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = [0] * len(RequestType)
        self.bytes_read = 0
        self.bytes_written = 0
        self.io_errors = 0
        self.unsupported_errors = 0
        self.in_flight = 0
        self.latency_buckets = [0] * (len(LATENCY_BOUNDS_NS) + 1)
        self.latency_sum_ns = 0

    def begin(self) -> int:
        """A request starts; returns its start time for :meth:`end`."""
        with self._lock:
            self.in_flight += 1
        return time.perf_counter_ns()

    def cancel(self) -> None:
        """The request begun is not served here after all (it moves to an I/O thread)."""
        with self._lock:
            self.in_flight -= 1

    def end(self, started: int, kind: RequestType, status: int, data_bytes: int) -> None:
        """The request begun at ``started`` finished with virtio-blk ``status``;
        ``data_bytes`` is what it moved between disk and guest (READ and WRITE only)."""
        elapsed = time.perf_counter_ns() - started
        bucket = bisect.bisect_left(LATENCY_BOUNDS_NS, elapsed)
        with self._lock:
            self.requests[kind] += 1
            if status == vb.VIRTIO_BLK_S_OK:
                if kind == RequestType.READ:
                    self.bytes_read += data_bytes
                elif kind == RequestType.WRITE:
                    self.bytes_written += data_bytes
            elif status == vb.VIRTIO_BLK_S_UNSUPP:
                self.unsupported_errors += 1
            else:
                self.io_errors += 1
            self.latency_buckets[bucket] += 1
            self.latency_sum_ns += elapsed
            self.in_flight -= 1

    def add_native(
        self,
        *,
        reads: int,
        writes: int,
        bytes_read: int,
        bytes_written: int,
        io_errors: int,
        lat_sum_ns: int,
        buckets: list[int],
    ) -> None:
        """Requests the C data plane served (``blkdev.fastpath``), in one step."""
        with self._lock:
            self.requests[RequestType.READ] += reads
            self.requests[RequestType.WRITE] += writes
            self.bytes_read += bytes_read
            self.bytes_written += bytes_written
            self.io_errors += io_errors
            self.latency_sum_ns += lat_sum_ns
            for i, n in enumerate(buckets):
                self.latency_buckets[i] += n

    def snapshot(self) -> QueueSnapshot:
        return QueueSnapshot(
            requests=tuple(self.requests),
            bytes_read=self.bytes_read,
            bytes_written=self.bytes_written,
            io_errors=self.io_errors,
            unsupported_errors=self.unsupported_errors,
            in_flight=self.in_flight,
            latency_buckets=tuple(self.latency_buckets),
            latency_sum_ns=self.latency_sum_ns,
        )


@dataclass(frozen=True, slots=True)
class QueueSnapshot:
    """The counters of one queue (or of a whole disk) at one moment.

    ``requests`` is indexed by :class:`RequestType`; ``latency_buckets`` holds one count per
    bound of :data:`LATENCY_BOUNDS_NS` plus the +Inf bucket, each bucket counting only its own
    requests (not cumulative).
    """

    requests: tuple[int, ...]
    bytes_read: int
    bytes_written: int
    io_errors: int
    unsupported_errors: int
    in_flight: int
    latency_buckets: tuple[int, ...]
    latency_sum_ns: int

    @property
    def total_requests(self) -> int:
        return sum(self.requests)

    @property
    def latency_count(self) -> int:
        return sum(self.latency_buckets)

    def __add__(self, other: QueueSnapshot) -> QueueSnapshot:
        return QueueSnapshot(
            requests=tuple(a + b for a, b in zip(self.requests, other.requests, strict=True)),
            bytes_read=self.bytes_read + other.bytes_read,
            bytes_written=self.bytes_written + other.bytes_written,
            io_errors=self.io_errors + other.io_errors,
            unsupported_errors=self.unsupported_errors + other.unsupported_errors,
            in_flight=self.in_flight + other.in_flight,
            latency_buckets=tuple(
                a + b for a, b in zip(self.latency_buckets, other.latency_buckets, strict=True)
            ),
            latency_sum_ns=self.latency_sum_ns + other.latency_sum_ns,
        )

    def to_json(self) -> dict[str, object]:
        """The ``query-stats`` shape of these counters (keys spelled as QMP does)."""
        bounds: list[int | None] = [*LATENCY_BOUNDS_NS, None]
        return {
            "requests": dict(zip(REQUEST_TYPE_NAMES, self.requests, strict=True)),
            "bytes": {"read": self.bytes_read, "written": self.bytes_written},
            "errors": {"ioerr": self.io_errors, "unsupp": self.unsupported_errors},
            "in-flight": self.in_flight,
            "latency": {
                "buckets": [
                    {"le-ns": bound, "count": count}
                    for bound, count in zip(bounds, self.latency_buckets, strict=True)
                ],
                "count": self.latency_count,
                "sum-ns": self.latency_sum_ns,
            },
        }


EMPTY: Final = QueueStats().snapshot()


@dataclass(frozen=True, slots=True)
class StatsSnapshot:
    """Every queue's counters, and the disk's (their sum)."""

    queues: tuple[QueueSnapshot, ...]

    @property
    def total(self) -> QueueSnapshot:
        total = EMPTY
        for queue in self.queues:
            total += queue
        return total

    def to_json(self) -> dict[str, object]:
        return {
            "queues": [{"queue": i, **q.to_json()} for i, q in enumerate(self.queues)],
            "total": self.total.to_json(),
        }


class DeviceStats:
    """The statistics of one device: a :class:`QueueStats` per queue. They live as long as the
    device, i.e. across front-end connections (the CLI serves every connection with one
    device)."""

    def __init__(self, num_queues: int) -> None:
        if num_queues < 1:
            raise ValueError(f"num_queues must be at least 1, not {num_queues}")
        self.queues: tuple[QueueStats, ...] = tuple(QueueStats() for _ in range(num_queues))

    def snapshot(self) -> StatsSnapshot:
        return StatsSnapshot(tuple(q.snapshot() for q in self.queues))
