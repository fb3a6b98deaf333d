"""``vhost-user-blk bench``: the front-end driver against real backends, ours (the ``serve``
process) and qemu-storage-daemon, through both of its loops (C, and the Python twin). It must
drive them without errors, count what it did, see the backend's CPU through --pid, and with
--verify read back exactly what it wrote (and catch a backend that fails writes)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blkdev import bench
from tests.protocol.serve_process import REPO, ServeProcess
from vhost_user import native

pytestmark = pytest.mark.qemu

LOOPS = ["C", "Python"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    proc = ServeProcess(tmp_path_factory.mktemp("bench"), num_queues=2, queue_size=256)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def qsd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    work = tmp_path_factory.mktemp("qsd")
    image = work / "q.img"
    image.write_bytes(os.urandom(16 << 20))
    sock = work / "qsd.sock"
    proc = subprocess.Popen(
        [
            shutil.which("qemu-storage-daemon") or "qemu-storage-daemon",
            "--blockdev",
            f"driver=file,node-name=f,filename={image},cache.direct=off,aio=io_uring",
            "--export",
            f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={sock},"
            "writable=on,num-queues=2",
        ],
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 20
    while not sock.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "qemu-storage-daemon did not start"
        time.sleep(0.05)
    yield str(sock), proc.pid
    proc.terminate()
    proc.wait(10)


def test_the_data_plane_is_the_one_chosen(server: ServeProcess) -> None:
    """The serve process under test runs the C data plane unless the suite runs the Python
    twin (deploy/test.sh runs this suite both ways)."""
    bench.run(bench.Options(server.socket, iodepth=4, seconds=0.2))
    want_c = os.environ.get("VHOST_USER_BLK_DATA_PLANE", "c") == "c"
    assert ("native data plane serves this queue" in server.log_text()) == want_c


def test_the_c_loop_is_built() -> None:
    """CI builds it (deploy/setup.sh): a bench that silently fell back would measure Python."""
    assert native.bench_driver() is not None


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("rw", ["randread", "write"])
def test_drives_our_backend(server: ServeProcess, loop: str, rw: str) -> None:
    opts = bench.Options(
        server.socket,
        rw=rw,
        iodepth=8,
        queues=2,
        seconds=0.5,
        pid=server.pid,
        python=loop == "Python",
    )
    report = bench.run(opts)
    assert report.loop == loop
    assert report.iops > 100 and report.errors == 0
    assert report.backend_cpu_us_per_io is not None and report.backend_cpu_us_per_io > 0
    assert 0 < report.lat_p50_us <= report.lat_p99_us <= report.lat_p999_us
    assert server.alive() and not server.crash_lines()


@pytest.mark.parametrize("event_idx", [True, False])
def test_drives_qemu_storage_daemon(qsd: tuple[str, int], event_idx: bool) -> None:
    sock, pid = qsd
    for loop in LOOPS:
        report = bench.run(
            bench.Options(
                sock,
                rw="randwrite",
                iodepth=16,
                queues=2,
                seconds=0.5,
                pid=pid,
                event_idx=event_idx,
                python=loop == "Python",
            )
        )
        assert report.iops > 100 and report.errors == 0, report


def test_verify_reads_back_what_was_written(server: ServeProcess) -> None:
    report = bench.run(
        bench.Options(server.socket, rw="randwrite", iodepth=8, seconds=0.5, verify=True)
    )
    assert report.verified > 50 and report.mismatches == 0 and report.loop == "Python"


def test_the_cli_reports_json_and_fails_on_errors(tmp_path: Path) -> None:
    """A read-only export fails every write: the run reports the errors and exits 1."""
    image = tmp_path / "ro.img"
    image.write_bytes(bytes(1 << 20))
    sock = tmp_path / "ro.sock"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    serve = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "blkdev.cli",
            "serve",
            "--socket",
            str(sock),
            "--image",
            str(image),
            "--format",
            "raw",
            "--read-only",
        ],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "blkdev.cli",
                "bench",
                "--socket",
                str(sock),
                "--rw",
                "write",
                "--iodepth",
                "4",
                "--seconds",
                "0.3",
                "--json",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 1, out.stderr
        report = json.loads(out.stdout)
        assert report["errors"] > 0 and report["errors"] * 4096 <= report["iops"] * 4096 * 10
        bad = subprocess.run(
            [
                sys.executable,
                "-m",
                "blkdev.cli",
                "bench",
                "--socket",
                str(sock),
                "--iodepth",
                "1000",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bad.returncode == 2 and "--iodepth" in bad.stderr
    finally:
        serve.terminate()
        serve.wait(10)


@given(st.integers(0, 1 << 40))
def test_latency_buckets_hold_their_latency(ns: int) -> None:
    b = bench.bucket_of(ns)
    assert bench.bucket_floor_ns(b) <= ns
    if b + 1 < bench.LAT_BUCKETS:
        assert ns < bench.bucket_floor_ns(b + 1)
        assert bench.bucket_floor_ns(b + 1) - bench.bucket_floor_ns(b) <= max(1, ns // 8)
