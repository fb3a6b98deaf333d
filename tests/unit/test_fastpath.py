"""The C data plane (``blkdev.fastpath``) against its Python twin: the same rings, served once
with the C fast path in front of the Python path and once by Python alone, leave the same used
ring, the same guest memory, the same image, the same statistics and the same inflight records.
Random chains (hypothesis) mix what C serves (plain reads and writes) with everything it must
leave to Python (flush, get-id, indirect tables, out-of-range sectors, odd lengths, bad
addresses, wrong directions) and plain garbage."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blkdev import native
from blkdev import virtio_blk as vb
from blkdev.device import BlkDevice
from blkdev.disks.raw import RawDisk
from memory import GuestMemory
from tests.support.driver_ring import DriverRing
from vhost_user.ring.inflight import InflightArea
from vhost_user.ring.split import SplitVirtqueue

MEM = 1 << 20
DISK = 256 << 10
SIZE = 64
RING = 0x1000
HDRS = 0x10000
DATA = 0x20000
STATUS = 0xF000
INDIRECT = (0xE000, 0x1000)


def test_the_c_data_plane_is_built() -> None:
    """CI builds it (deploy/setup.sh); without it the twin comparison would compare Python
    with itself."""
    assert native.blk_fast() is not None


Segs = list[tuple[int, int, bool]]
Request = tuple[int, int, Segs, bool]


@st.composite
def requests(draw: st.DrawFn) -> list[Request]:
    """(type, sector, data buffers (gpa, length, writable), indirect) per request."""
    out = []
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from([0, 0, 0, 1, 1, 1, 4, 8, 3]))
        sector = draw(st.one_of(st.integers(0, DISK // 512 - 8), st.integers(0, 1 << 20)))
        segs = []
        for _ in range(draw(st.integers(0, 3))):
            gpa = DATA + 0x1000 * draw(st.integers(0, 40)) + draw(st.sampled_from([0, 0, 512, 3]))
            length = draw(st.sampled_from([512, 1024, 4096, 4096, 100, 0]))
            if draw(st.integers(0, 30)) == 0:
                gpa = MEM + 0x1000  # outside guest memory
            writable = (kind == 0) != (draw(st.integers(0, 15)) == 0)
            segs.append((gpa, length, writable))
        out.append((kind, sector, segs, draw(st.integers(0, 8)) == 0))
    return out


class _Rig:
    def __init__(self, tmp: Path, name: str, image: bytes, *, c: int, inflight: bool) -> None:
        self.mem = GuestMemory.allocate(MEM)
        self.path = tmp / f"{name}.img"
        self.path.write_bytes(image)
        self.disk = RawDisk.open(str(self.path), cache="writeback")
        self.device = BlkDevice(
            self.disk, num_queues=1, io_threads=0, data_plane="c" if c else "python"
        )
        self.driver = DriverRing.at(self.mem, RING, SIZE, indirect_area=INDIRECT)
        self.area: InflightArea | None = None
        region = None
        if inflight:
            self.area, self.area_fd = InflightArea.create(1, SIZE)
            region = self.area.queues[0]
        self.queue = SplitVirtqueue(
            self.mem,
            SIZE,
            self.driver.desc_gpa,
            self.driver.avail_gpa,
            self.driver.used_gpa,
            event_idx=True,
            inflight=region,
        )
        self.fast = self.device.fast_path(0, self.queue, self.mem)
        assert (self.fast is not None) == bool(c)

    def add(
        self, i: int, kind: int, sector: int, segs: list[tuple[int, int, bool]], indirect: bool
    ) -> None:
        hdr = HDRS + 16 * i
        self.mem.write_at(hdr, vb.RequestHeader(kind, 0, sector).pack())
        self.mem.write_at(STATUS + i, b"\xff")
        chain = [(hdr, 16, False), *segs, (STATUS + i, 1, True)]
        self.driver.add_chain(chain, indirect=indirect, publish=False)

    def serve(self) -> None:
        """What the queue worker does, inline: the fast path first, then one Python pop."""
        self.driver.publish()
        while True:
            if self.fast is not None:
                served, punted, notify = self.fast.serve(64)
                if not punted and served < 64 and not notify:
                    break
                if not punted:
                    continue
            chain = self.queue.pop()
            if chain is None:
                break
            self.device.submit_chain(
                0, self.mem, chain, lambda n, h=chain.head: self.queue.push_used(h, n)
            )

    def close(self) -> None:
        if self.fast is not None:
            self.fast.close()
        self.disk.close()
        if self.area is not None:
            self.area.close()
            os.close(self.area_fd)
        self.mem.close()


@pytest.fixture
def image() -> bytes:
    return os.urandom(DISK)


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(batch=requests(), seed=st.integers(0, 1 << 32), inflight=st.booleans())
def test_c_then_python_serves_exactly_as_python_alone(
    tmp_path: Path, image: bytes, batch: list[Request], seed: int, inflight: bool
) -> None:
    data = random.Random(seed).randbytes(64 << 10)
    rigs = [_Rig(tmp_path, n, image, c=c, inflight=inflight) for n, c in (("c", 1), ("py", 0))]
    try:
        for rig in rigs:
            rig.mem.write_at(DATA, data)
            for i, (kind, sector, segs, indirect) in enumerate(batch):
                rig.add(i, kind, sector, segs, indirect)
            rig.serve()
        c, py = rigs
        assert c.driver.used_entries() == py.driver.used_entries()
        assert c.mem.read_at(0, MEM) == py.mem.read_at(0, MEM)
        assert c.path.read_bytes() == py.path.read_bytes()
        assert c.queue.native_state()[:3] == py.queue.native_state()[:3]
        sc, sp = c.device.stats.queues[0].snapshot(), py.device.stats.queues[0].snapshot()
        assert (sc.requests, sc.bytes_read, sc.bytes_written, sc.io_errors) == (
            sp.requests,
            sp.bytes_read,
            sp.bytes_written,
            sp.io_errors,
        )
        if inflight:
            assert c.area is not None and py.area is not None
            assert bytes(c.area.view) == bytes(py.area.view)
    finally:
        for rig in rigs:
            rig.close()


def test_c_serves_plain_requests_and_leaves_the_rest(tmp_path: Path, image: bytes) -> None:
    rig = _Rig(tmp_path, "c", image, c=True, inflight=False)
    try:
        rig.add(0, vb.VIRTIO_BLK_T_IN, 8, [(DATA, 4096, True)], False)
        rig.add(1, vb.VIRTIO_BLK_T_OUT, 16, [(DATA + 0x1000, 512, False)], False)
        rig.add(2, vb.VIRTIO_BLK_T_FLUSH, 0, [], False)
        rig.add(3, vb.VIRTIO_BLK_T_IN, 8, [(DATA, 4096, True)], False)
        rig.driver.publish()
        assert rig.fast is not None
        assert rig.fast.serve(64)[:2] == (2, True)  # the FLUSH is Python's
        assert rig.queue.native_state()[0] == 2
        assert rig.driver.used_entries() == [(0, 4097), (3, 1)]  # heads: first descriptors
        assert rig.mem.read_at(DATA, 4096) == image[8 * 512 : 8 * 512 + 4096]
        assert rig.mem.read_at(STATUS, 2) == b"\0\0"
        chain = rig.queue.pop()
        assert chain is not None and len(chain.descriptors) == 2  # the FLUSH
        rig.device.submit_chain(0, rig.mem, chain, lambda n: rig.queue.push_used(chain.head, n))
        assert rig.fast.serve(64)[:2] == (1, False)
        assert rig.mem.read_at(STATUS + 2, 2) == b"\0\0"
    finally:
        rig.close()
