"""virtio-blk through the real server: a Python front-end reads and writes a raw image file
via vhost-user, with the real BlkDevice behind the socket."""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from blkdev.device import BlkDevice
from blkdev.disks import open_disk
from blkdev.disks.disk import Disk
from tests.protocol.frontend import (
    BUFFERS_GPA,
    Driver,
    Frontend,
    FrontendMemory,
    MiB,
    make_driver,
    ring_layout,
)
from vhost_user.server import Server

VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_RING_F_EVENT_IDX = 1 << 29
IMAGE_SIZE = 4 * MiB
REQ_HDR = struct.Struct("<IIQ")


@dataclass
class Session:
    fe: Frontend
    memory: FrontendMemory
    driver: Driver
    features: int
    next_buf: int = BUFFERS_GPA

    def alloc(self, n: int) -> int:
        gpa = self.next_buf
        self.next_buf += (n + 0xFFF) & ~0xFFF
        assert self.next_buf < MiB
        return gpa

    def request(
        self,
        kind: int,
        sector: int,
        data: bytes = b"",
        read_len: int = 0,
        *,
        indirect: bool = False,
    ) -> tuple[int, bytes]:
        """One virtio-blk request; returns (status, data read)."""
        self.next_buf = BUFFERS_GPA
        hdr = self.alloc(16)
        self.memory.mem.write_at(hdr, REQ_HDR.pack(kind, 0, sector))
        bufs: list[tuple[int, int, bool]] = [(hdr, 16, False)]
        if data:
            gpa = self.alloc(len(data))
            self.memory.mem.write_at(gpa, data)
            bufs.append((gpa, len(data), False))
        if read_len:
            rd = self.alloc(read_len)
            bufs.append((rd, read_len, True))
        status = self.alloc(1)
        self.memory.mem.write_at(status, b"\xff")
        bufs.append((status, 1, True))
        head = self.driver.add(bufs, indirect)
        self.fe.kick(0)
        used: list[tuple[int, int]] = []
        for _ in range(50):
            self.fe.wait_call(0, timeout=0.2)
            used = self.driver.used()
            if used:
                break
        assert used and used[0][0] == head, used
        out = self.memory.mem.read_at(rd, read_len) if read_len else b""
        return self.memory.mem.read_at(status, 1)[0], out


def start(path: str, image: str, *, read_only: bool) -> tuple[Server, threading.Thread, Disk]:
    disk = open_disk(image, fmt="raw", read_only=read_only, cache="writeback")
    device = BlkDevice(disk, num_queues=1, serial="proto", read_only=read_only, queue_size=128)
    server = Server(path, device, message_timeout=2.0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread, disk


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(range(256)) * (IMAGE_SIZE // 256))
    return path


def open_session(path: str) -> Session:
    memory = FrontendMemory()
    fe = Frontend.connect(path)
    features = fe.handshake()
    fe.set_features(features)
    fe.set_mem_table(memory)
    lay = ring_layout(0)
    driver = make_driver(memory.mem, lay, event_idx=bool(features & VIRTIO_RING_F_EVENT_IDX))
    fe.setup_vring(0, memory, size=lay.size, desc=lay.desc, avail=lay.avail, used=lay.used)
    return Session(fe, memory, driver, features)


@pytest.fixture
def served(tmp_path: Path, image: Path) -> Iterator[str]:
    path = str(tmp_path / "blk.sock")
    server, thread, disk = start(path, str(image), read_only=False)
    yield path
    server.stop()
    thread.join(10)
    disk.close()


def test_config_reports_capacity_in_sectors(served: str) -> None:
    s = open_session(served)
    try:
        assert struct.unpack_from("<Q", s.fe.config)[0] == IMAGE_SIZE // 512
    finally:
        s.fe.close()
        s.memory.close()


def test_read_write_flush_reach_the_image(served: str, image: Path) -> None:
    s = open_session(served)
    try:
        status, data = s.request(VIRTIO_BLK_T_IN, 2, read_len=1024)
        assert status == VIRTIO_BLK_S_OK
        assert data == image.read_bytes()[1024:2048]
        payload = os.urandom(8192)
        assert s.request(VIRTIO_BLK_T_OUT, 16, data=payload)[0] == VIRTIO_BLK_S_OK
        assert s.request(VIRTIO_BLK_T_FLUSH, 0)[0] == VIRTIO_BLK_S_OK
        assert s.request(VIRTIO_BLK_T_IN, 16, read_len=8192) == (VIRTIO_BLK_S_OK, payload)
        s.fe.set_vring_enable(0, False)
        assert s.fe.get_vring_base(0) == 4
    finally:
        s.fe.close()
        s.memory.close()
    assert image.read_bytes()[16 * 512 : 16 * 512 + 8192] == payload


def test_indirect_requests(served: str, image: Path) -> None:
    s = open_session(served)
    try:
        payload = os.urandom(4096)
        assert s.request(VIRTIO_BLK_T_OUT, 40, data=payload, indirect=True)[0] == VIRTIO_BLK_S_OK
        status, data = s.request(VIRTIO_BLK_T_IN, 40, read_len=4096, indirect=True)
        assert (status, data) == (VIRTIO_BLK_S_OK, payload)
    finally:
        s.fe.close()
        s.memory.close()


def test_read_past_the_end_fails_the_request_not_the_connection(served: str) -> None:
    s = open_session(served)
    try:
        status, _ = s.request(VIRTIO_BLK_T_IN, IMAGE_SIZE // 512, read_len=512)
        assert status == VIRTIO_BLK_S_IOERR
        assert s.request(VIRTIO_BLK_T_IN, 0, read_len=512)[0] == VIRTIO_BLK_S_OK
    finally:
        s.fe.close()
        s.memory.close()


def test_read_only_export_refuses_writes(tmp_path: Path, image: Path) -> None:
    path = str(tmp_path / "ro.sock")
    before = image.read_bytes()
    server, thread, disk = start(path, str(image), read_only=True)
    try:
        s = open_session(path)
        try:
            assert s.features & VIRTIO_BLK_F_RO
            status, _ = s.request(VIRTIO_BLK_T_OUT, 0, data=bytes(512))
            assert status != VIRTIO_BLK_S_OK
        finally:
            s.fe.close()
            s.memory.close()
    finally:
        server.stop()
        thread.join(10)
        disk.close()
    assert image.read_bytes() == before


def test_reconnect_after_a_session(served: str, image: Path) -> None:
    for n in range(2):
        s = open_session(served)
        try:
            assert s.request(VIRTIO_BLK_T_OUT, n, data=bytes([n + 1]) * 512)[0] == VIRTIO_BLK_S_OK
        finally:
            s.fe.close()
            s.memory.close()
    data = image.read_bytes()
    assert data[:512] == b"\x01" * 512 and data[512:1024] == b"\x02" * 512
