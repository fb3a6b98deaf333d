"""RBD images served for real: the ``serve`` process (or the in-process server) over librbd, on
the cluster of ``deploy/ceph.sh``, driven by a Python front-end or the bench driver, checked
against what the ``rbd`` tool exports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from blkdev import bench
from blkdev.device import BlkDevice
from blkdev.disks import open_disk
from blkdev.disks.rbd import RbdDisk
from blkdev.errors import ImageError
from tests.protocol.test_blk_protocol import (
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    open_session,
)
from tests.rbd.conftest import REPO, Cluster
from vhost_user.server import Server

MiB = 1 << 20
SIZE = 16 * MiB
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_T_GET_ID = 8


@contextmanager
def _in_process(spec: str, path: str, *, read_only: bool = False) -> Iterator[BlkDevice]:
    disk = open_disk(spec, read_only=read_only)
    assert disk.format_name == "rbd"
    device = BlkDevice(disk, num_queues=1, serial="rbd-test", read_only=read_only, queue_size=128)
    server = Server(path, device, message_timeout=5.0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield device
    finally:
        server.stop()
        thread.join(10)
        disk.close()


@pytest.fixture
def image(ceph: Cluster, tmp_path: Path) -> str:
    name = ceph.create(SIZE)
    ceph.write(name, bytes(range(256)) * (SIZE // 256), tmp_path / "pattern")
    return name


@pytest.fixture
def served(ceph: Cluster, image: str, tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "rbd.sock")
    with _in_process(ceph.spec(image), path):
        yield path


def _dwz(sector: int, sectors: int, flags: int = 0) -> bytes:
    return (
        sector.to_bytes(8, "little") + sectors.to_bytes(4, "little") + flags.to_bytes(4, "little")
    )


def test_read_write_flush_reach_the_image(
    ceph: Cluster, image: str, served: str, tmp_path: Path
) -> None:
    s = open_session(served)
    data = os.urandom(64 * 1024)
    assert s.request(VIRTIO_BLK_T_OUT, 2048 + 7, data)[0] == VIRTIO_BLK_S_OK
    assert s.request(VIRTIO_BLK_T_FLUSH, 0)[0] == VIRTIO_BLK_S_OK
    status, back = s.request(VIRTIO_BLK_T_IN, 2048 + 7, read_len=len(data))
    assert (status, back) == (VIRTIO_BLK_S_OK, data)
    exported = ceph.export(image, tmp_path / "out")
    offset = (2048 + 7) * 512
    assert exported[offset : offset + len(data)] == data
    pattern = bytes(range(256)) * (SIZE // 256)
    assert exported[:offset] == pattern[:offset]
    assert exported[offset + len(data) :] == pattern[offset + len(data) :]
    status, serial = s.request(VIRTIO_BLK_T_GET_ID, 0, read_len=20)
    assert (status, serial.rstrip(b"\0")) == (VIRTIO_BLK_S_OK, b"rbd-test")
    s.fe.close()


def test_write_zeroes_and_discard(ceph: Cluster, image: str, served: str, tmp_path: Path) -> None:
    s = open_session(served)
    # Two segments in one request, one of them allowed to unmap: both read as zeros.
    segs = _dwz(100, 8) + _dwz(5000, 16, flags=1)
    assert s.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, segs)[0] == VIRTIO_BLK_S_OK
    # A whole object (4 MiB, the discard granularity the guest is told) discarded.
    assert s.request(VIRTIO_BLK_T_DISCARD, 0, _dwz(8192, 8192))[0] == VIRTIO_BLK_S_OK
    exported = ceph.export(image, tmp_path / "out")
    assert exported[100 * 512 : 108 * 512] == bytes(8 * 512)
    assert exported[5000 * 512 : 5016 * 512] == bytes(16 * 512)
    assert exported[99 * 512 : 100 * 512] == (bytes(range(256)) * 2)
    # Past the end: the request fails, the connection serves on.
    assert s.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, _dwz(SIZE // 512 - 4, 8))[0] == (
        VIRTIO_BLK_S_IOERR
    )
    assert s.request(VIRTIO_BLK_T_IN, 0, read_len=512)[0] == VIRTIO_BLK_S_OK
    s.fe.close()


def test_a_snapshot_is_served_read_only(ceph: Cluster, image: str, tmp_path: Path) -> None:
    ceph.rbd("snap", "create", f"rbd/{image}@before")
    ceph.rbd("bench", "--io-type", "write", "--io-total", "1M", f"rbd/{image}")  # after it
    path = str(tmp_path / "snap.sock")
    with _in_process(ceph.spec(f"{image}@before"), path) as device:
        assert device.read_only
        s = open_session(path)
        assert s.features & VIRTIO_BLK_F_RO
        assert s.request(VIRTIO_BLK_T_OUT, 0, b"x" * 512)[0] == VIRTIO_BLK_S_IOERR
        status, back = s.request(VIRTIO_BLK_T_IN, 0, read_len=512)
        assert (status, back) == (VIRTIO_BLK_S_OK, bytes(range(256)) * 2)
        s.fe.close()


def test_open_errors_say_what_is_wrong(ceph: Cluster) -> None:
    with pytest.raises(ImageError, match="cannot open rbd image rbd/missing"):
        open_disk(ceph.spec("missing"))
    with pytest.raises(ImageError, match="cannot open rbd image nopool/x"):
        open_disk(f"rbd:nopool/x:conf={ceph.conf}")
    with pytest.raises(ImageError, match="not POOL/IMAGE"):
        open_disk("rbd:justaname")
    with pytest.raises(ValueError, match="rbd images are named rbd:"):
        open_disk("/some/path", fmt="rbd")


def test_a_resize_elsewhere_is_seen(ceph: Cluster, image: str) -> None:
    disk = RbdDisk.open(ceph.spec(image)[len("rbd:") :])
    try:
        seen = threading.Event()
        stop = disk.follow_size(seen.set)
        assert stop is not None
        ceph.rbd("resize", f"rbd/{image}", "--size", f"{2 * SIZE}B")
        assert seen.wait(30), "the header watch never fired"
        assert disk.refresh_size() == 2 * SIZE
    finally:
        disk.close()


# -- the serve process ---------------------------------------------------------------------------


class Serve:
    def __init__(self, tmp: Path, spec: str, *extra: str) -> None:
        self.socket = str(tmp / "serve.sock")
        self.log_path = tmp / "serve.log"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "blkdev.cli",
                    "serve",
                    "--socket",
                    self.socket,
                    "--image",
                    spec,
                    "--log-format",
                    "json",
                    "--log-level",
                    "info",
                    *extra,
                ],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        deadline = time.monotonic() + 60
        while '"event": "listening"' not in self.log():
            assert self.proc.poll() is None, f"serve exited:\n{self.log()}"
            assert time.monotonic() < deadline, f"serve did not start:\n{self.log()}"
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(60)


@pytest.fixture
def serve(ceph: Cluster, image: str, tmp_path: Path) -> Iterator[Serve]:
    proc = Serve(tmp_path, ceph.spec(image), "--num-queues", "2")
    yield proc
    proc.stop()
    assert "Traceback" not in proc.log()


def test_many_requests_in_flight_verify(serve: Serve) -> None:
    """Depth 32 on two queues, every block written then read back and checked: the
    asynchronous path keeps many requests at librbd at once, completes them out of order."""
    report = bench.run(
        bench.Options(
            serve.socket,
            rw="randwrite",
            iodepth=32,
            queues=2,
            seconds=3.0,
            verify=True,
            pid=serve.proc.pid,
        )
    )
    assert report.errors == 0 and report.mismatches == 0 and report.verified > 100, report
    print(f"\nrbd randwrite QD32x2 verify: {report.iops:.0f} IOPS, p50 {report.lat_p50_us:.0f} us")


def test_a_killed_backend_loses_no_completed_write(
    ceph: Cluster, image: str, serve: Serve, tmp_path: Path
) -> None:
    """librbd's cache is off: a write the guest saw complete is in the cluster, flushed or
    not, when the backend dies with SIGKILL."""
    s = open_session(serve.socket)
    data = os.urandom(128 * 1024)
    assert s.request(VIRTIO_BLK_T_OUT, 4096, data)[0] == VIRTIO_BLK_S_OK
    serve.stop(signal.SIGKILL)
    s.fe.close()
    exported = ceph.export(image, tmp_path / "out")
    assert exported[4096 * 512 : 4096 * 512 + len(data)] == data


def test_image_info_on_rbd(ceph: Cluster, image: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "blkdev.cli", "image", "info", ceph.spec(image)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        timeout=60,
        check=True,
    )
    info = json.loads(out.stdout)
    assert info["format"] == "rbd" and info["virtual-size"] == SIZE
    assert info["object-size"] == 4 * MiB and info["filename"] == ceph.spec(image)
