"""BlkDevice end to end: chains in real guest memory, a RawDisk on a real file."""

from __future__ import annotations

import os
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blkdev import virtio_blk as vb
from blkdev.device import BlkDevice
from blkdev.disks.raw import RawDisk
from memory import GuestMemory
from vhost_user.device import VhostUserDevice
from vhost_user.errors import GuestFault
from vhost_user.ring import features
from vhost_user.ring.chain import Descriptor, DescriptorChain

DISK_SIZE = 1 << 20
MEM_SIZE = 1 << 20
R, W = False, True
HDR, DATA, STATUS = 0x1000, 0x10000, 0x2000


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory.allocate(MEM_SIZE) as mem:
        yield mem


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    path.write_bytes(os.urandom(DISK_SIZE))
    return path


@pytest.fixture
def disk(image: Path) -> Iterator[RawDisk]:
    d = RawDisk.open(str(image))
    yield d
    d.close()


@pytest.fixture
def device(disk: RawDisk) -> BlkDevice:
    return BlkDevice(disk, num_queues=2, serial="serial-123", read_only=False)


def request(
    memory: GuestMemory,
    kind: int,
    sector: int = 0,
    *,
    out: bytes = b"",
    in_len: int = 0,
    header_gpa: int = HDR,
) -> DescriptorChain:
    """Canonical layout: header | out data (readable) | in data (writable) | status."""
    memory.write_at(header_gpa, vb.RequestHeader(kind, 0, sector).pack())
    memory.write_at(STATUS, b"\xff")
    descs = [Descriptor(header_gpa, 16, R)]
    if out:
        memory.write_at(DATA, out)
        descs.append(Descriptor(DATA, len(out), R))
    if in_len:
        descs.append(Descriptor(DATA, in_len, W))
    descs.append(Descriptor(STATUS, 1, W))
    return DescriptorChain(head=3, descriptors=tuple(descs))


def status(memory: GuestMemory) -> int:
    return memory.read_at(STATUS, 1)[0]


def test_write_then_read(device: BlkDevice, memory: GuestMemory, image: Path) -> None:
    data = os.urandom(8192)
    assert device.handle_chain(0, memory, request(memory, vb.VIRTIO_BLK_T_OUT, 8, out=data)) == 1
    assert status(memory) == vb.VIRTIO_BLK_S_OK
    memory.write_at(DATA, bytes(8192))
    used = device.handle_chain(1, memory, request(memory, vb.VIRTIO_BLK_T_IN, 8, in_len=8192))
    assert used == 8193
    assert status(memory) == vb.VIRTIO_BLK_S_OK
    assert memory.read_at(DATA, 8192) == data
    assert device.handle_chain(0, memory, request(memory, vb.VIRTIO_BLK_T_FLUSH)) == 1
    assert status(memory) == vb.VIRTIO_BLK_S_OK
    assert image.read_bytes()[4096 : 4096 + 8192] == data


def test_get_id(device: BlkDevice, memory: GuestMemory) -> None:
    memory.write_at(DATA, b"\xaa" * 64)
    used = device.handle_chain(0, memory, request(memory, vb.VIRTIO_BLK_T_GET_ID, in_len=64))
    assert used == 21
    assert memory.read_at(DATA, 21) == b"serial-123" + bytes(10) + b"\xaa"
    assert status(memory) == vb.VIRTIO_BLK_S_OK


def dwz(*segments: tuple[int, int, int]) -> bytes:
    return b"".join(vb.DwzSegment(*s).pack() for s in segments)


def test_discard_and_write_zeroes(device: BlkDevice, memory: GuestMemory, image: Path) -> None:
    chain = request(memory, vb.VIRTIO_BLK_T_DISCARD, out=dwz((0, 8, 0), (16, 8, 0)))
    assert device.handle_chain(0, memory, chain) == 1
    assert status(memory) == vb.VIRTIO_BLK_S_OK
    chain = request(memory, vb.VIRTIO_BLK_T_WRITE_ZEROES, out=dwz((100, 3, 1)))
    assert device.handle_chain(0, memory, chain) == 1
    assert status(memory) == vb.VIRTIO_BLK_S_OK
    content = image.read_bytes()
    assert content[:4096] == bytes(4096)
    assert content[8192 : 8192 + 4096] == bytes(4096)
    assert content[100 * 512 : 103 * 512] == bytes(3 * 512)
    # UNMAP on a DISCARD is UNSUPP (5.2.6.2); nothing happens.
    chain = request(memory, vb.VIRTIO_BLK_T_DISCARD, out=dwz((200, 8, 1)))
    assert device.handle_chain(0, memory, chain) == 1
    assert status(memory) == vb.VIRTIO_BLK_S_UNSUPP
    assert image.read_bytes()[200 * 512 : 208 * 512] == content[200 * 512 : 208 * 512]


@pytest.mark.parametrize(
    ("sector", "length"), [(DISK_SIZE // 512 - 1, 1024), (DISK_SIZE // 512, 512), (2**63, 512)]
)
def test_out_of_capacity(device: BlkDevice, memory: GuestMemory, sector: int, length: int) -> None:
    assert device.handle_chain(0, memory, request(memory, 0, sector, in_len=length)) == 1
    assert status(memory) == vb.VIRTIO_BLK_S_IOERR
    chain = request(memory, vb.VIRTIO_BLK_T_OUT, sector, out=bytes(length))
    assert device.handle_chain(0, memory, chain) == 1
    assert status(memory) == vb.VIRTIO_BLK_S_IOERR


def test_read_only_refuses_writes(disk: RawDisk, memory: GuestMemory, image: Path) -> None:
    before = image.read_bytes()
    device = BlkDevice(disk, read_only=True)
    features = device.device_features()
    assert features & (1 << vb.VIRTIO_BLK_F_RO)
    assert not features & (1 << vb.VIRTIO_BLK_F_DISCARD)
    for chain in (
        request(memory, vb.VIRTIO_BLK_T_OUT, out=bytes(512)),
        request(memory, vb.VIRTIO_BLK_T_DISCARD, out=dwz((0, 8, 0))),
        request(memory, vb.VIRTIO_BLK_T_WRITE_ZEROES, out=dwz((0, 8, 0))),
    ):
        assert device.handle_chain(0, memory, chain) == 1
        assert status(memory) == vb.VIRTIO_BLK_S_IOERR
    assert device.handle_chain(0, memory, request(memory, 0, in_len=512)) == 513
    assert status(memory) == vb.VIRTIO_BLK_S_OK
    assert image.read_bytes() == before


def test_status_in_a_readable_descriptor_is_not_written(
    device: BlkDevice, memory: GuestMemory
) -> None:
    memory.write_at(HDR, vb.RequestHeader(vb.VIRTIO_BLK_T_FLUSH, 0, 0).pack())
    memory.write_at(STATUS, b"\xff")
    chain = DescriptorChain(0, (Descriptor(HDR, 16, R), Descriptor(STATUS, 1, R)))
    assert device.handle_chain(0, memory, chain) == 0
    assert status(memory) == 0xFF


def test_status_outside_memory(device: BlkDevice, memory: GuestMemory) -> None:
    memory.write_at(HDR, vb.RequestHeader(vb.VIRTIO_BLK_T_FLUSH, 0, 0).pack())
    chain = DescriptorChain(0, (Descriptor(HDR, 16, R), Descriptor(MEM_SIZE, 1, W)))
    assert device.handle_chain(0, memory, chain) == 0


def test_data_outside_memory_is_ioerr(device: BlkDevice, memory: GuestMemory) -> None:
    memory.write_at(HDR, vb.RequestHeader(vb.VIRTIO_BLK_T_IN, 0, 0).pack())
    descs = (Descriptor(HDR, 16, R), Descriptor(MEM_SIZE - 512, 1024, W), Descriptor(STATUS, 1, W))
    assert device.handle_chain(0, memory, DescriptorChain(0, descs)) == 1
    assert status(memory) == vb.VIRTIO_BLK_S_IOERR


def test_faulty_chains(device: BlkDevice, memory: GuestMemory) -> None:
    chain = request(memory, vb.VIRTIO_BLK_T_IN, in_len=512)
    complete = DescriptorChain(3, chain.descriptors, GuestFault("bad buffer"), complete=True)
    assert device.handle_chain(0, memory, complete) == 0
    assert status(memory) == vb.VIRTIO_BLK_S_IOERR
    memory.write_at(STATUS, b"\xff")
    broken = DescriptorChain(3, chain.descriptors, GuestFault("loop"), complete=False)
    assert device.handle_chain(0, memory, broken) == 0
    assert status(memory) == 0xFF


def test_local_io_error_is_ioerr(device: BlkDevice, memory: GuestMemory, image: Path) -> None:
    os.truncate(image, 4096)  # the image shrank behind our back
    assert device.handle_chain(0, memory, request(memory, 0, 64, in_len=512)) == 1
    assert status(memory) == vb.VIRTIO_BLK_S_IOERR


def test_config_space(device: BlkDevice) -> None:
    raw = device.read_config(0, vb.CONFIG.size)
    cfg = vb.BlkConfig.unpack(raw)
    assert cfg.capacity == DISK_SIZE // 512
    assert cfg.num_queues == 2
    assert cfg.blk_size == 512
    assert cfg.writeback == 1
    assert cfg.seg_max == 126
    assert cfg.max_discard_seg > 0 and cfg.write_zeroes_may_unmap == 1
    assert device.read_config(8, 4) == raw[8:12]
    assert device.read_config(60, 100) == raw[60:] + bytes(100 - 12)
    with pytest.raises(ValueError):
        device.read_config(4000, 200)
    with pytest.raises(ValueError):
        device.write_config(4096, b"\0")


def test_writeback_is_the_only_writable_field(device: BlkDevice) -> None:
    before = device.read_config(0, 72)
    device.write_config(0, bytes(72))
    after = device.read_config(0, 72)
    assert after[32] == 0
    assert after[:32] == before[:32] and after[33:] == before[33:]
    device.write_config(32, b"\x01")
    assert device.read_config(32, 1) == b"\x01"


def test_writeback_needs_config_wce_and_flush(device: BlkDevice) -> None:
    features = device.device_features()
    device.set_acked_features(features & ~(1 << vb.VIRTIO_BLK_F_CONFIG_WCE))
    device.write_config(32, b"\x00")
    assert device.read_config(32, 1) == b"\x01"  # ignored without CONFIG_WCE
    device.set_acked_features(features & ~(1 << vb.VIRTIO_BLK_F_FLUSH))
    assert device.read_config(32, 1) == b"\x00"  # no FLUSH: write-through
    device.set_acked_features(features)
    assert device.read_config(32, 1) == b"\x01"


def test_write_through_choice_survives_renegotiation(device: BlkDevice) -> None:
    # A backend reconnection re-sends SET_FEATURES but not the guest's cache choice.
    device.set_acked_features(device.device_features())
    device.write_config(32, b"\x00")
    device.set_acked_features(device.device_features())
    assert device.read_config(32, 1) == b"\x00"


class CountingDisk(RawDisk):
    flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def test_write_through_flushes_every_write(image: Path, memory: GuestMemory) -> None:
    disk = CountingDisk.open(str(image))
    try:
        assert isinstance(disk, CountingDisk)
        device = BlkDevice(disk)
        device.handle_chain(0, memory, request(memory, vb.VIRTIO_BLK_T_OUT, out=bytes(512)))
        assert disk.flushes == 0
        device.write_config(32, b"\x00")  # the flush that makes earlier writes durable
        assert disk.flushes == 1
        device.handle_chain(0, memory, request(memory, vb.VIRTIO_BLK_T_OUT, out=bytes(512)))
        assert disk.flushes == 2
        device.quiesce()
        assert disk.flushes == 3
    finally:
        disk.close()


def test_features(device: BlkDevice) -> None:
    implements: VhostUserDevice = device  # checked by mypy
    f = implements.device_features()
    for bit in (
        features.VIRTIO_F_VERSION_1,
        features.VIRTIO_RING_F_INDIRECT_DESC,
        features.VIRTIO_RING_F_EVENT_IDX,
        vb.VIRTIO_BLK_F_SIZE_MAX,
        vb.VIRTIO_BLK_F_SEG_MAX,
        vb.VIRTIO_BLK_F_BLK_SIZE,
        vb.VIRTIO_BLK_F_FLUSH,
        vb.VIRTIO_BLK_F_TOPOLOGY,
        vb.VIRTIO_BLK_F_CONFIG_WCE,
        vb.VIRTIO_BLK_F_MQ,
        vb.VIRTIO_BLK_F_DISCARD,
        vb.VIRTIO_BLK_F_WRITE_ZEROES,
    ):
        assert f & (1 << bit), bit
    assert not f & (1 << vb.VIRTIO_BLK_F_RO)
    assert device.num_queues == 2 and device.max_queue_size == 1024


def test_discard_not_acked_is_unsupported(device: BlkDevice, memory: GuestMemory) -> None:
    device.set_acked_features(device.device_features() & ~(1 << vb.VIRTIO_BLK_F_DISCARD))
    chain = request(memory, vb.VIRTIO_BLK_T_DISCARD, out=dwz((0, 8, 0)))
    assert device.handle_chain(0, memory, chain) == 1
    assert status(memory) == vb.VIRTIO_BLK_S_UNSUPP


def test_bad_arguments(disk: RawDisk) -> None:
    with pytest.raises(ValueError):
        BlkDevice(disk, num_queues=0)
    with pytest.raises(ValueError):
        BlkDevice(disk, queue_size=1000)


def test_queues_in_parallel(device: BlkDevice, image: Path) -> None:
    with GuestMemory.allocate(MEM_SIZE) as mem:

        def worker(q: int) -> None:
            base = 0x40000 * (q + 1)
            for i in range(50):
                sector = (q * 50 + i) * 8
                mem.write_at(base, vb.RequestHeader(vb.VIRTIO_BLK_T_OUT, 0, sector).pack())
                mem.write_at(base + 0x1000, bytes([q * 50 + i]) * 4096)
                chain = DescriptorChain(
                    i,
                    (
                        Descriptor(base, 16, R),
                        Descriptor(base + 0x1000, 4096, R),
                        Descriptor(base + 0x3000, 1, W),
                    ),
                )
                assert device.handle_chain(q, mem, chain) == 1
                assert mem.read_at(base + 0x3000, 1) == b"\0"

        threads = [threading.Thread(target=worker, args=(q,)) for q in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
            assert not t.is_alive(), "a worker thread hung"
    content = image.read_bytes()
    for n in range(100):
        assert content[n * 4096 : (n + 1) * 4096] == bytes([n]) * 4096


@pytest.fixture(scope="module")
def shared_device() -> Iterator[tuple[BlkDevice, GuestMemory, Path]]:
    with tempfile.TemporaryDirectory() as tmp, GuestMemory.allocate(64 * 1024) as mem:
        path = Path(tmp) / "disk.raw"
        path.write_bytes(bytes(64 * 1024))
        disk = RawDisk.open(str(path))
        try:
            yield BlkDevice(disk, serial="x"), mem, path
        finally:
            disk.close()


descriptor = st.builds(
    Descriptor,
    st.one_of(st.integers(0, 64 * 1024), st.integers(0, 2**64 - 1)),
    st.one_of(st.integers(0, 9000), st.integers(0, 2**32 - 1)),
    st.booleans(),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    descs=st.lists(descriptor, max_size=6),
    header=st.tuples(
        st.sampled_from([0, 1, 4, 8, 10, 11, 13, 14, 99]),
        st.integers(0, 2**32 - 1),
        st.one_of(st.integers(0, 140), st.integers(0, 2**64 - 1)),
    ),
    payload=st.binary(max_size=64),
    fault=st.sampled_from([None, "complete", "broken"]),
)
def test_garbage_never_raises(
    shared_device: tuple[BlkDevice, GuestMemory, Path],
    descs: list[Descriptor],
    header: tuple[int, int, int],
    payload: bytes,
    fault: str | None,
) -> None:
    device, mem, path = shared_device
    mem.write_at(0, struct.pack("<IIQ", *header) + payload)
    chain = DescriptorChain(
        0,
        tuple(descs),
        None if fault is None else GuestFault("x"),
        complete=fault != "broken",
    )
    used = device.handle_chain(0, mem, chain)
    writable = sum(d.length for d in descs if d.device_writable)
    assert 0 <= used <= writable
    if fault is not None:
        assert used == 0
    assert path.stat().st_size == 64 * 1024


def test_odd_layout_end_to_end(device: BlkDevice, memory: GuestMemory, image: Path) -> None:
    # Header split 10 + 6, its tail sharing a descriptor with the data; the read's data and
    # status sharing one writable descriptor.
    data = os.urandom(1024)
    header = vb.RequestHeader(vb.VIRTIO_BLK_T_OUT, 0, 4).pack()
    memory.write_at(0x5000, header[:10])
    memory.write_at(0x7000, header[10:] + data)
    chain = DescriptorChain(
        0, (Descriptor(0x5000, 10, R), Descriptor(0x7000, 6 + 1024, R), Descriptor(STATUS, 1, W))
    )
    assert device.handle_chain(0, memory, chain) == 1
    assert status(memory) == vb.VIRTIO_BLK_S_OK
    assert image.read_bytes()[2048 : 2048 + 1024] == data

    memory.write_at(0x5000, vb.RequestHeader(vb.VIRTIO_BLK_T_IN, 0, 4).pack())
    chain = DescriptorChain(0, (Descriptor(0x5000, 16, R), Descriptor(0x9000, 1025, W)))
    assert device.handle_chain(0, memory, chain) == 1025
    assert memory.read_at(0x9000, 1025) == data + bytes([vb.VIRTIO_BLK_S_OK])


@settings(max_examples=200, deadline=None)
@given(
    kind=st.sampled_from([0, 1, 8, 11, 13]),
    sector=st.integers(0, 130),
    data=st.lists(descriptor, min_size=1, max_size=4),
    segments=st.binary(max_size=48),
)
def test_valid_header_with_garbage_buffers(
    shared_device: tuple[BlkDevice, GuestMemory, Path],
    kind: int,
    sector: int,
    data: list[Descriptor],
    segments: bytes,
) -> None:
    device, mem, path = shared_device
    mem.write_at(0x100, segments)
    mem.write_at(0, vb.RequestHeader(kind, 0, sector).pack())
    chain = DescriptorChain(0, (Descriptor(0, 16, R), *data))
    used = device.handle_chain(0, mem, chain)
    assert 0 <= used <= sum(d.length for d in data if d.device_writable)
    assert path.stat().st_size == 64 * 1024


# -- submit and complete (the asynchronous model) ----------------------------------------------


class _SlowFlushDisk(RawDisk):
    """A raw image whose flush waits for the test: a flush to storage that takes its time."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.release_flush = threading.Event()
        self.flushing = threading.Event()
        self.flushed_on: set[int] = set()

    def flush(self) -> None:
        self.flushing.set()
        self.flushed_on.add(threading.get_ident())
        assert self.release_flush.wait(10), "the test never let the flush finish"
        super().flush()


def test_a_slow_flush_does_not_hold_back_the_requests_behind_it(
    image: Path, memory: GuestMemory
) -> None:
    """Same queue: a FLUSH waiting for storage, then a READ and a WRITE submitted after it;
    both complete while the flush still waits, and the flush completes last."""
    disk = _SlowFlushDisk.open(str(image))
    device = BlkDevice(disk, num_queues=1)
    done: list[tuple[str, int]] = []
    lock = threading.Lock()

    def completion(name: str) -> Callable[[int], None]:
        def complete(length: int) -> None:
            with lock:
                done.append((name, length))

        return complete

    def chain(kind: int, gpa: int, sector: int = 0, **kw: Any) -> DescriptorChain:
        memory.write_at(gpa, vb.RequestHeader(kind, 0, sector).pack())
        descs = [Descriptor(gpa, 16, R)]
        if kw.get("out"):
            memory.write_at(gpa + 0x100, kw["out"])
            descs.append(Descriptor(gpa + 0x100, len(kw["out"]), R))
        if kw.get("in_len"):
            descs.append(Descriptor(gpa + 0x100, kw["in_len"], W))
        descs.append(Descriptor(gpa + 0x80, 1, W))
        return DescriptorChain(head=gpa >> 12, descriptors=tuple(descs))

    try:
        device.submit_chain(0, memory, chain(vb.VIRTIO_BLK_T_FLUSH, 0x1000), completion("flush"))
        assert disk.flushing.wait(5)
        device.submit_chain(
            0, memory, chain(vb.VIRTIO_BLK_T_IN, 0x3000, 8, in_len=4096), completion("read")
        )
        device.submit_chain(
            0, memory, chain(vb.VIRTIO_BLK_T_OUT, 0x5000, 16, out=b"w" * 512), completion("write")
        )
        deadline = time.monotonic() + 5
        while len(done) < 2:
            assert time.monotonic() < deadline, done
            time.sleep(0.01)
        assert sorted(done) == [("read", 4097), ("write", 1)]
        disk.release_flush.set()
        while len(done) < 3:
            assert time.monotonic() < deadline, done
            time.sleep(0.01)
        assert done[2] == ("flush", 1)
        assert memory.read_at(0x3100, 4096) == image.read_bytes()[8 * 512 : 8 * 512 + 4096]
    finally:
        disk.release_flush.set()
        disk.close()


@pytest.mark.parametrize("io_threads", [0, 4])
def test_io_threads_zero_serves_requests_on_the_queues_own_thread(
    image: Path, memory: GuestMemory, io_threads: int
) -> None:
    """0: every request, a FLUSH included, is served before submit_chain returns, on the
    caller's thread (one at a time, as before the asynchronous model); otherwise a FLUSH goes
    to an I/O thread."""
    disk = _SlowFlushDisk.open(str(image))
    disk.release_flush.set()
    device = BlkDevice(disk, num_queues=1, io_threads=io_threads)
    try:
        done = threading.Event()
        memory.write_at(HDR, vb.RequestHeader(vb.VIRTIO_BLK_T_FLUSH, 0, 0).pack())
        chain = DescriptorChain(
            head=1, descriptors=(Descriptor(HDR, 16, R), Descriptor(STATUS, 1, W))
        )
        device.submit_chain(0, memory, chain, lambda length: done.set())
        assert done.wait(5)
        inline = disk.flushed_on == {threading.get_ident()}
        assert inline == (io_threads == 0)
    finally:
        disk.close()
