"""Per-queue statistics: the counters alone, then as BlkDevice records them for requests in
real guest memory on a real raw image."""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blkdev import stats
from blkdev import virtio_blk as vb
from blkdev.device import BlkDevice
from blkdev.disks.raw import RawDisk
from blkdev.stats import (
    LATENCY_BOUNDS_NS,
    REQUEST_TYPE_NAMES,
    DeviceStats,
    QueueStats,
    RequestType,
)
from memory import GuestMemory
from vhost_user.errors import GuestFault
from vhost_user.ring.chain import Descriptor, DescriptorChain

OK, IOERR, UNSUPP = vb.VIRTIO_BLK_S_OK, vb.VIRTIO_BLK_S_IOERR, vb.VIRTIO_BLK_S_UNSUPP
R, W = False, True
HDR, DATA, STATUS = 0x1000, 0x10000, 0x2000


class FakeClock:
    def __init__(self) -> None:
        self.now = 10**12

    def perf_counter_ns(self) -> int:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(stats, "time", SimpleNamespace(perf_counter_ns=fake.perf_counter_ns))
    return fake


def record(q: QueueStats, clock: FakeClock, elapsed: int, *args: object) -> None:
    started = q.begin()
    clock.now += elapsed
    q.end(started, *args)  # type: ignore[arg-type]


def test_bounds_are_log_spaced_and_end_in_inf() -> None:
    assert LATENCY_BOUNDS_NS[0] == 1_000 and LATENCY_BOUNDS_NS[-1] == 10**10
    ratios = {b / a for a, b in itertools.pairwise(LATENCY_BOUNDS_NS)}
    assert ratios <= {2.0, 2.5}
    assert len(QueueStats().latency_buckets) == len(LATENCY_BOUNDS_NS) + 1
    assert len(REQUEST_TYPE_NAMES) == len(RequestType)


@pytest.mark.parametrize(
    ("elapsed", "bucket"),
    [(0, 0), (1_000, 0), (1_001, 1), (2_000, 1), (4_999, 2), (10**10, 21), (10**10 + 1, 22)],
)
def test_a_request_lands_in_the_first_bucket_its_latency_fits(
    clock: FakeClock, elapsed: int, bucket: int
) -> None:
    q = QueueStats()
    record(q, clock, elapsed, RequestType.FLUSH, OK, 0)
    counts = q.snapshot().latency_buckets
    assert counts[bucket] == 1 and sum(counts) == 1
    assert q.snapshot().latency_sum_ns == elapsed


def test_bytes_count_only_for_successful_reads_and_writes(clock: FakeClock) -> None:
    q = QueueStats()
    record(q, clock, 5, RequestType.READ, OK, 4096)
    record(q, clock, 5, RequestType.WRITE, OK, 512)
    record(q, clock, 5, RequestType.READ, IOERR, 4096)
    record(q, clock, 5, RequestType.GET_ID, OK, 20)
    record(q, clock, 5, RequestType.DISCARD, UNSUPP, 0)
    s = q.snapshot()
    assert (s.bytes_read, s.bytes_written) == (4096, 512)
    assert (s.io_errors, s.unsupported_errors) == (1, 1)
    assert s.requests[RequestType.READ] == 2 and s.total_requests == 5
    assert s.in_flight == 0 and s.latency_count == 5 and s.latency_sum_ns == 25


def test_in_flight_counts_begun_requests(clock: FakeClock) -> None:
    q = QueueStats()
    started = q.begin()
    assert q.snapshot().in_flight == 1
    q.end(started, RequestType.READ, OK, 0)
    assert q.snapshot().in_flight == 0


operations = st.lists(
    st.tuples(
        st.sampled_from(list(RequestType)),
        st.sampled_from([OK, IOERR, UNSUPP]),
        st.integers(0, 1 << 20),
        st.integers(0, 2 * 10**10),
        st.integers(0, 2),
    ),
    max_size=50,
)


@given(operations)
def test_snapshots_match_a_model_and_totals_sum_the_queues(
    ops: list[tuple[RequestType, int, int, int, int]],
) -> None:
    clock = FakeClock()
    original = stats.time
    stats.time = SimpleNamespace(perf_counter_ns=clock.perf_counter_ns)  # type: ignore[assignment]
    try:
        device = DeviceStats(3)
        for kind, status, nbytes, elapsed, queue in ops:
            record(device.queues[queue], clock, elapsed, kind, status, nbytes)
    finally:
        stats.time = original
    snap = device.snapshot()
    total = snap.total
    assert total.total_requests == len(ops) == total.latency_count
    assert total.latency_sum_ns == sum(op[3] for op in ops)
    assert total.bytes_read == sum(n for k, s, n, _, _ in ops if k == RequestType.READ and s == OK)
    assert total.bytes_written == sum(
        n for k, s, n, _, _ in ops if k == RequestType.WRITE and s == OK
    )
    assert total.io_errors == sum(1 for op in ops if op[1] == IOERR)
    assert total.unsupported_errors == sum(1 for op in ops if op[1] == UNSUPP)
    for i, q in enumerate(snap.queues):
        assert q.total_requests == sum(1 for op in ops if op[4] == i)
    as_json = snap.to_json()
    assert [q["queue"] for q in as_json["queues"]] == [0, 1, 2]  # type: ignore[index]
    latency = as_json["total"]["latency"]  # type: ignore[index]
    assert latency["count"] == sum(b["count"] for b in latency["buckets"])
    assert latency["buckets"][-1]["le-ns"] is None


def test_racy_readers_see_monotonic_counters_and_the_final_count() -> None:
    """One writer (the queue's worker), several readers, no lock: no update is lost and no
    reader sees a counter go backwards."""
    device = DeviceStats(1)
    q = device.queues[0]
    n = 20_000
    done = threading.Event()
    problems: list[str] = []

    def reader() -> None:
        last = 0
        while not done.is_set():
            total = device.snapshot().total
            if total.total_requests < last:
                problems.append(f"went back from {last} to {total.total_requests}")
            if total.latency_count != sum(total.latency_buckets):
                problems.append("histogram count is not the sum of its buckets")
            last = total.total_requests

    readers = [threading.Thread(target=reader) for _ in range(3)]
    for t in readers:
        t.start()
    try:
        for _ in range(n):
            q.end(q.begin(), RequestType.WRITE, OK, 512)
    finally:
        done.set()
        for t in readers:
            t.join(30)
    assert not problems
    final = device.snapshot().total
    assert final.requests[RequestType.WRITE] == n and final.bytes_written == 512 * n


def test_device_stats_needs_a_queue() -> None:
    with pytest.raises(ValueError):
        DeviceStats(0)


# -- recorded by BlkDevice ---------------------------------------------------------------------


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory.allocate(1 << 20) as mem:
        yield mem


@pytest.fixture
def device(tmp_path: Path) -> Iterator[BlkDevice]:
    path = tmp_path / "disk.raw"
    path.write_bytes(os.urandom(1 << 20))
    disk = RawDisk.open(str(path))
    yield BlkDevice(disk, num_queues=2, serial="stats")
    disk.close()


def chain_for(
    memory: GuestMemory, kind: int, sector: int = 0, *, out: bytes = b"", in_len: int = 0
) -> DescriptorChain:
    memory.write_at(HDR, vb.RequestHeader(kind, 0, sector).pack())
    descs = [Descriptor(HDR, 16, R)]
    if out:
        memory.write_at(DATA, out)
        descs.append(Descriptor(DATA, len(out), R))
    if in_len:
        descs.append(Descriptor(DATA, in_len, W))
    descs.append(Descriptor(STATUS, 1, W))
    return DescriptorChain(head=0, descriptors=tuple(descs))


def dwz(sector: int, count: int, flags: int = 0) -> bytes:
    return vb.DwzSegment(sector, count, flags).pack()


def test_blk_device_records_every_kind_of_request(device: BlkDevice, memory: GuestMemory) -> None:
    device.set_acked_features(device.device_features())
    # Each chain is built just before it is served: they share the header's guest memory.
    requests: list[tuple[int, Callable[[], DescriptorChain]]] = [
        (0, lambda: chain_for(memory, vb.VIRTIO_BLK_T_IN, 0, in_len=4096)),
        (0, lambda: chain_for(memory, vb.VIRTIO_BLK_T_IN, 1 << 20, in_len=512)),  # past the end
        (0, lambda: chain_for(memory, vb.VIRTIO_BLK_T_OUT, 8, out=bytes(1024))),
        (1, lambda: chain_for(memory, vb.VIRTIO_BLK_T_FLUSH)),
        (1, lambda: chain_for(memory, vb.VIRTIO_BLK_T_GET_ID, in_len=20)),
        (1, lambda: chain_for(memory, vb.VIRTIO_BLK_T_DISCARD, out=dwz(0, 8))),
        (1, lambda: chain_for(memory, vb.VIRTIO_BLK_T_WRITE_ZEROES, out=dwz(8, 8))),
        (1, lambda: chain_for(memory, vb.VIRTIO_BLK_T_DISCARD, out=dwz(0, 8, 1))),  # UNMAP
        (1, lambda: chain_for(memory, 0x77)),  # an unknown type: UNSUPP
        (0, lambda: DescriptorChain(0, (Descriptor(HDR, 8, R), Descriptor(STATUS, 1, W)))),
        (0, lambda: DescriptorChain(0, (Descriptor(HDR, 16, R),))),  # no status byte
        (0, lambda: DescriptorChain(0, (Descriptor(HDR, 16, R),), GuestFault("x"), False)),
    ]
    for queue, make in requests:
        device.handle_chain(queue, memory, make())
    q0, q1 = device.stats.snapshot().queues
    named = dict(zip(REQUEST_TYPE_NAMES, q0.requests, strict=True))
    assert named == {**dict.fromkeys(REQUEST_TYPE_NAMES, 0), "read": 2, "write": 1, "invalid": 3}
    assert (q0.bytes_read, q0.bytes_written, q0.io_errors, q0.unsupported_errors) == (
        4096,
        1024,
        4,
        0,
    )
    named = dict(zip(REQUEST_TYPE_NAMES, q1.requests, strict=True))
    assert named == {
        **dict.fromkeys(REQUEST_TYPE_NAMES, 0),
        "flush": 1,
        "get-id": 1,
        "discard": 2,
        "write-zeroes": 1,
        "unsupported": 1,
    }
    assert (q1.bytes_read, q1.bytes_written, q1.io_errors, q1.unsupported_errors) == (0, 0, 0, 2)
    for q in (q0, q1):
        assert q.in_flight == 0 and q.latency_count == q.total_requests
        assert q.latency_sum_ns > 0


def test_a_request_that_raises_is_still_counted(
    device: BlkDevice, memory: GuestMemory, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(device, "_serve", broken)
    with pytest.raises(RuntimeError):
        device.handle_chain(0, memory, chain_for(memory, vb.VIRTIO_BLK_T_IN, 0, in_len=512))
    q = device.stats.snapshot().queues[0]
    assert q.in_flight == 0 and q.total_requests == 1 and q.io_errors == 1
