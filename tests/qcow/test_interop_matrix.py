"""Interop matrix: images made and changed by qemu-img (amend, resize, rebase, commit,
snapshot, bitmap, crashed lazy-refcount writers), written through QcowDisk and the real
server, then judged by qemu-img (``check`` clean, ``compare`` equal to a raw shadow) and
written on top by qemu-io and read back byte-exact."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blkdev.disks.qcow import QcowDisk
from blkdev.disks.qcow.header import (
    BITMAP_DIR_ENTRY,
    EXT_BITMAPS,
    EXTENSION,
    extensions_without,
    parse_header,
)
from blkdev.errors import BlkdevError, UnsupportedImageError
from memory import GuestMemory, request_buffers_from_buffers
from tests.protocol.serve_process import (
    DWZ_SEG,
    REPO,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    BlkSession,
)
from tests.qcow.helpers import (
    MiB,
    as_raw,
    assert_clean,
    guest_read,
    guest_write,
    qemu_img,
    qemu_io,
    read_all,
)


@pytest.fixture(scope="module")
def memory() -> Iterator[GuestMemory]:
    with GuestMemory.allocate(4 * MiB) as mem:
        yield mem


def _info(img: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads(qemu_img("info", "--output=json", img).stdout)
    return data


def _assert_same(img: Path, shadow: bytes, tmp_path: Path) -> None:
    raw = tmp_path / "shadow.raw"
    raw.write_bytes(shadow)
    proc = qemu_img("compare", "-f", "qcow2", "-F", "raw", img, raw, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _reads_like_qemu(img: Path, tmp_path: Path) -> bytes:
    expected = as_raw(img, tmp_path / "expected.raw")
    disk = QcowDisk.open(str(img), read_only=True)
    try:
        assert disk.size == len(expected)
        assert read_all(disk) == expected
    finally:
        disk.close()
    return expected


def _workload(
    disk: QcowDisk,
    mem: GuestMemory,
    shadow: bytearray,
    *,
    seed: int,
    ops: int,
    cs: int,
    unmap: bool = True,
) -> None:
    """Sequential runs, random and sub-cluster writes, writes straddling cluster edges,
    discard and write-zeroes; ``unmap=False`` keeps every allocation (no discard)."""
    rnd = random.Random(seed)
    size = disk.size
    seq = 0
    for i in range(ops):
        r = rnd.random()
        if i % 7 == 0:  # sequential stream
            n = min(rnd.randrange(1, 17) * 512, size - seq)
            off = seq
            seq = (seq + n) % size
        elif r < 0.3:  # straddles a cluster boundary by a few sectors
            edge = rnd.randrange(1, max(2, size // cs)) * cs
            off = max(0, edge - rnd.randrange(1, 9) * 512)
            n = min(rnd.randrange(2, 17) * 512, size - off)
        else:
            off = rnd.randrange(0, size // 512) * 512
            n = min(rnd.randrange(1, 2 * cs // 512 + 4) * 512, size - off, 2 * MiB)
        if n <= 0:
            continue
        op = rnd.random()
        if op < 0.6:
            data = rnd.randbytes(n)
            guest_write(disk, mem, off, data, gpa=rnd.randrange(0, 8) * 512)
            shadow[off : off + n] = data
        elif op < 0.7 and unmap:
            disk.discard(off, n)
            a, b = -(-off // cs) * cs, min((off + n) // cs * cs, size)
            if b > a:
                shadow[a:b] = bytes(b - a)
        elif op < 0.85:
            disk.write_zeroes(off, n, unmap=unmap and rnd.random() < 0.5)
            shadow[off : off + n] = bytes(n)
        elif op < 0.9:
            disk.flush()
        else:
            assert guest_read(disk, mem, off, n, gpa=512) == shadow[off : off + n]


def _write_through_us(
    img: Path, tmp_path: Path, mem: GuestMemory, *, seed: int, ops: int = 120, unmap: bool = True
) -> bytes:
    """Workload on top of what qemu-img reads; check clean, compare equal; the content."""
    shadow = bytearray(as_raw(img, tmp_path / "before.raw"))
    cs = int(str(_info(img)["cluster-size"]))
    disk = QcowDisk.open(str(img), read_only=False)
    try:
        assert read_all(disk) == shadow
        _workload(disk, mem, shadow, seed=seed, ops=ops, cs=cs, unmap=unmap)
    finally:
        disk.close()
    assert_clean(img)
    _assert_same(img, bytes(shadow), tmp_path)
    return bytes(shadow)


def _qemu_io_on_top(img: Path, tmp_path: Path, size: int) -> None:
    """qemu-io writes on our image (its allocator over our metadata, a compressed cluster
    included) and we read them back byte-exact."""
    cs = int(str(_info(img)["cluster-size"]))
    half = size // 2
    last = (size // cs - 2) * cs
    qemu_io(
        img,
        f"write -P 0xa5 {half - 1536} 70144",
        "write -z 0 65536",
        f"write -z -u {half + 131072} 65536",
        f"discard {last} {cs}",
        f"write -c -P 0x5c {last} {cs}",
    )
    assert_clean(img)
    _reads_like_qemu(img, tmp_path)


def _refused(img: Path, *words: str) -> None:
    with pytest.raises(UnsupportedImageError) as info:
        QcowDisk.open(str(img), read_only=False)
    for w in words:
        assert w in str(info.value), str(info.value)


# ----------------------------------------------------------------------------- features


def test_lazy_refcounts_crashed_writer(tmp_path: Path, memory: GuestMemory) -> None:
    """A lazy-refcount writer killed mid-way leaves the dirty bit: readable as it is,
    writable only after the qemu-img repair the refusal names."""
    img = tmp_path / "lazy.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4096", img, "4M")
    proc = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x17 12800 1M", "-c", "sigraise 9", str(img)],
        capture_output=True,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL
    assert _info(img)["dirty-flag"] is True
    _reads_like_qemu(img, tmp_path)
    _refused(img, "dirty", f"qemu-img check -r all {img}", "--read-only")
    qemu_img("check", "-r", "all", img)
    assert _info(img)["dirty-flag"] is False
    _write_through_us(img, tmp_path, memory, seed=1)
    spec = _info(img)["format-specific"]
    assert isinstance(spec, dict) and spec["data"]["lazy-refcounts"] is True
    _qemu_io_on_top(img, tmp_path, 4 * MiB)


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 32, 64])
def test_refcount_widths_read_then_amend(tmp_path: Path, memory: GuestMemory, bits: int) -> None:
    img = tmp_path / "rc.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"refcount_bits={bits},cluster_size=512", img, "1M")
    qemu_io(img, "write -P 0x3 1024 70000", "write -z -u 4096 512")
    _reads_like_qemu(img, tmp_path)
    if bits != 16:
        _refused(img, f"{bits}-bit refcounts", f"qemu-img amend -o refcount_bits=16 {img}")
    qemu_img("amend", "-o", "refcount_bits=16", img)
    _write_through_us(img, tmp_path, memory, seed=bits, ops=60)


def test_compat_010_then_amended(tmp_path: Path, memory: GuestMemory) -> None:
    img = tmp_path / "v2.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "compat=0.10,cluster_size=4096", img, "2M")
    qemu_io(img, "write -P 0x44 0 100000", "write -z 65536 8192", "discard 8192 4096")
    _reads_like_qemu(img, tmp_path)
    _refused(img, "version 2", f"qemu-img amend -o compat=1.1 {img}")
    qemu_img("amend", "-o", "compat=1.1", img)
    _write_through_us(img, tmp_path, memory, seed=2)
    _qemu_io_on_top(img, tmp_path, 2 * MiB)


def test_internal_snapshot_then_deleted(tmp_path: Path, memory: GuestMemory) -> None:
    """Shared clusters (refcount 2, no COPIED flag) are read; after the snapshot is gone
    qemu's leftover flags are ours to fix up while writing."""
    img = tmp_path / "snap.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", img, "2M")
    qemu_io(img, "write -P 0x51 0 1M")
    qemu_img("snapshot", "-c", "s1", img)
    qemu_io(img, "write -P 0x52 4096 8192", "write -z 256k 64k")
    _reads_like_qemu(img, tmp_path)
    _refused(img, "1 internal snapshot", f"qemu-img snapshot -d NAME {img}", "--read-only")
    qemu_img("snapshot", "-d", "s1", img)
    assert_clean(img)
    _write_through_us(img, tmp_path, memory, seed=3)


def test_persistent_bitmap_dropped_cleanly(tmp_path: Path, memory: GuestMemory) -> None:
    """A bitmap-unaware writer must drop persistent bitmaps (qcow2.txt, autoclear bits) and
    leave no leaked clusters behind for qemu-img check to report."""
    (tmp_path / "base.raw").write_bytes(b"\x60" * MiB)
    img = tmp_path / "bm.qcow2"
    qemu_img(
        "create", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "base.raw", "-F", "raw", img, "4M"
    )
    qemu_img("bitmap", "--add", img, "b0")
    qemu_img("bitmap", "--add", "-g", "512", img, "b1")
    qemu_io(img, "write -P 0x61 0 3M")
    _reads_like_qemu(img, tmp_path)
    _write_through_us(img, tmp_path, memory, seed=4)
    proc = qemu_img("check", img, check=False)
    assert proc.returncode == 0 and "bitmap" not in proc.stderr, proc.stdout + proc.stderr
    info = _info(img)
    assert info["backing-filename-format"] == "raw"  # the other extensions survive
    spec = info["format-specific"]
    assert isinstance(spec, dict) and "bitmaps" not in spec["data"]


@pytest.mark.parametrize("cluster_size", [512, 65536, 2 * MiB])
@pytest.mark.parametrize("prealloc", ["metadata", "falloc", "full"])
def test_preallocated_images_written_in_place(
    tmp_path: Path, memory: GuestMemory, prealloc: str, cluster_size: int
) -> None:
    img = tmp_path / "pre.qcow2"
    size = 4 * MiB + 3 * 512  # ends inside a cluster for the larger sizes
    qemu_img(
        "create",
        "-f",
        "qcow2",
        "-o",
        f"preallocation={prealloc},cluster_size={cluster_size}",
        img,
        str(size),
    )
    before = img.stat().st_size
    _write_through_us(img, tmp_path, memory, seed=cluster_size, ops=60, unmap=False)
    # Every cluster was there already: nothing new was allocated.
    assert img.stat().st_size == before
    report = json.loads(qemu_img("check", "--output=json", img).stdout)
    assert report["allocated-clusters"] == -(-size // cluster_size)


def test_zstd_compressed_overwritten_then_qemu_io(tmp_path: Path, memory: GuestMemory) -> None:
    src = tmp_path / "src.raw"
    text = b"".join(b"zstd line %07d\n" % i for i in range(200_000))[: 3 * MiB]
    src.write_bytes(text + os.urandom(MiB))
    img = tmp_path / "z.qcow2"
    qemu_img(
        "convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd,cluster_size=4096", src, img
    )
    spec = _info(img)["format-specific"]
    assert isinstance(spec, dict) and spec["data"]["compression-type"] == "zstd"
    _write_through_us(img, tmp_path, memory, seed=5, ops=150)
    _qemu_io_on_top(img, tmp_path, 4 * MiB)
    # And back: our writes over qemu's compressed and zero clusters.
    _write_through_us(img, tmp_path, memory, seed=17, ops=100)


@pytest.mark.parametrize("cluster_size", [512, 2 * MiB])
def test_extreme_clusters_odd_size_over_short_backing(
    tmp_path: Path, memory: GuestMemory, cluster_size: int
) -> None:
    """Tiny and huge clusters, a virtual size that ends inside a cluster, a qcow2 backing
    file shorter than the overlay whose size is not a cluster multiple either."""
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=65536", base, str(3 * MiB + 1024))
    qemu_io(base, f"write -P 0x21 0 {3 * MiB + 1024}")
    img = tmp_path / "top.qcow2"
    qemu_img(
        "create",
        "-f",
        "qcow2",
        "-o",
        f"cluster_size={cluster_size}",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        img,
        str(6 * MiB + 2560),
    )
    base_before = base.read_bytes()
    _write_through_us(img, tmp_path, memory, seed=6, ops=120)
    assert base.read_bytes() == base_before
    _qemu_io_on_top(img, tmp_path, 6 * MiB)


# ----------------------------------------------------------------------------- chains


def test_chain_depth3_relative_paths_then_commit_and_rebase(
    tmp_path: Path, memory: GuestMemory
) -> None:
    """raw <- qcow2 (512 B clusters, compressed) <- qcow2 in a sibling folder <- top we write;
    then qemu-img commit and rebase see what we wrote."""
    lower = tmp_path / "lower"
    upper = tmp_path / "upper"
    lower.mkdir()
    upper.mkdir()
    rnd = random.Random(7)
    (lower / "base.raw").write_bytes(rnd.randbytes(2 * MiB + 512))
    plain = lower / "plain.qcow2"
    qemu_img(
        "create", "-f", "qcow2", "-o", "cluster_size=512", "-b", "base.raw", "-F", "raw", plain
    )
    qemu_io(plain, "write -P 0x31 4096 300000")
    mid = lower / "mid.qcow2"
    qemu_img(
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=512",
        "-B",
        "base.raw",
        "-F",
        "raw",
        plain,
        mid,
    )
    upper_img = upper / "up.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "../lower/mid.qcow2", "-F", "qcow2", upper_img, "3M")
    qemu_io(upper_img, "write -P 0x32 1M 100000", "write -z 1536k 64k")
    top = upper / "top.qcow2"
    qemu_img(
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "-b",
        "up.qcow2",
        "-F",
        "qcow2",
        top,
        "4M",
    )
    _reads_like_qemu(top, tmp_path)
    chain_before = {p: p.read_bytes() for p in (lower / "base.raw", mid, upper_img)}
    content = _write_through_us(top, tmp_path, memory, seed=8, ops=150)
    assert {p: p.read_bytes() for p in chain_before} == chain_before
    # Rebase (safe mode) straight onto the raw base, by absolute name: the content stays.
    qemu_img("rebase", "-f", "qcow2", "-b", str(lower / "base.raw"), "-F", "raw", top)
    assert _reads_like_qemu(top, tmp_path) == content
    _write_through_us(top, tmp_path, memory, seed=9, ops=60)
    # Commit our overlay into the raw base: the base now reads as the overlay did.
    final = as_raw(top, tmp_path / "final.raw")
    qemu_img("commit", "-f", "qcow2", top)
    assert (lower / "base.raw").read_bytes()[: 2 * MiB + 512] == final[: 2 * MiB + 512]


def test_resize_grows_l1_then_shrink(tmp_path: Path, memory: GuestMemory) -> None:
    img = tmp_path / "rs.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=512", img, "1M")
    _write_through_us(img, tmp_path, memory, seed=10, ops=40)
    l1_before = int.from_bytes(img.read_bytes()[40:48], "big")
    qemu_img("resize", img, "9M")  # 32 -> 288 L1 entries: the table moves
    assert int.from_bytes(img.read_bytes()[40:48], "big") != l1_before
    _reads_like_qemu(img, tmp_path)
    _write_through_us(img, tmp_path, memory, seed=11, ops=120)
    qemu_img("resize", "--shrink", img, "5M")
    _reads_like_qemu(img, tmp_path)
    _write_through_us(img, tmp_path, memory, seed=12, ops=60)


def test_empty_image_grown_by_resize(tmp_path: Path, memory: GuestMemory) -> None:
    img = tmp_path / "empty.qcow2"
    qemu_img("create", "-f", "qcow2", img, "0")
    disk = QcowDisk.open(str(img), read_only=False)
    assert disk.size == 0
    disk.close()
    assert_clean(img)
    qemu_img("resize", img, "3M")
    _write_through_us(img, tmp_path, memory, seed=16, ops=60)


def test_amend_toggles_and_keeps_header_extensions(tmp_path: Path, memory: GuestMemory) -> None:
    base = tmp_path / "b.raw"
    base.write_bytes(b"\x66" * MiB)
    img = tmp_path / "a.qcow2"
    qemu_img(
        "create", "-f", "qcow2", "-o", "lazy_refcounts=on", "-b", "b.raw", "-F", "raw", img, "2M"
    )
    qemu_img("amend", "-o", "lazy_refcounts=off", img)
    info_before = _info(img)
    _write_through_us(img, tmp_path, memory, seed=13)
    info_after = _info(img)
    for key in ("backing-filename", "backing-filename-format", "virtual-size", "cluster-size"):
        assert info_after[key] == info_before[key], key
    spec = info_after["format-specific"]
    assert isinstance(spec, dict)
    assert spec["data"]["lazy-refcounts"] is False and spec["data"]["compat"] == "1.1"


# ----------------------------------------------------------------------------- server


def _serve_args(img: Path, sock: str, extra: tuple[str, ...]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "blkdev.cli",
        "serve",
        "--socket",
        sock,
        "--image",
        str(img),
        "--format",
        "qcow2",
        "--log-format",
        "json",
        *extra,
    ]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


@contextmanager
def _serve(img: Path, tmp_path: Path, *extra: str) -> Iterator[str]:
    """``vhost-user-blk serve`` on ``img``; yields its socket, and stops it with SIGTERM
    (as a user would), which must end it cleanly."""
    sock = str(tmp_path / "blk.sock")
    log_path = tmp_path / "serve.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            _serve_args(img, sock, extra),
            cwd=REPO,
            env=_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        deadline = time.monotonic() + 20
        while '"listening"' not in log_path.read_text(errors="replace"):
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.02)
        yield sock
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(20)
    assert rc == 0, log_path.read_text()


def test_served_through_the_real_server(tmp_path: Path) -> None:
    """``vhost-user-blk serve`` on a qcow2 overlay: virtio-blk writes, discard, write-zeroes
    (with and without unmap), flush; then SIGTERM and qemu-img judges the file."""
    base = tmp_path / "base.raw"
    rnd = random.Random(14)
    base.write_bytes(rnd.randbytes(3 * MiB))
    img = tmp_path / "srv.qcow2"
    qemu_img(
        "create", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "base.raw", "-F", "raw", img, "4M"
    )
    shadow = bytearray(base.read_bytes() + bytes(MiB))
    statuses: list[int] = []
    with (
        _serve(img, tmp_path, "--num-queues", "2") as sock,
        BlkSession.open(sock, queues=range(2)) as s,
    ):
        # Both queues at once, eight writes in flight each, into disjoint stripes: the
        # per-queue workers allocate clusters concurrently.
        for batch in range(6):
            stripes = rnd.sample(range(4 * MiB // 65536), 16)
            for q in (0, 1):
                gpa = s.area(q)
                for stripe in stripes[q * 8 : q * 8 + 8]:
                    sector = stripe * 128 + rnd.randrange(0, 64)
                    data = rnd.randbytes(rnd.randrange(1, 64) * 512)
                    hdr = s.header(gpa, VIRTIO_BLK_T_OUT, sector)
                    buf = s.put(gpa + 16, data)
                    status = s.status_at(gpa + 16 + len(data))
                    s.rings[q].add_chain(
                        [(hdr, 16, False), (buf, len(data), False), (status, 1, True)],
                        batch % 2 == 1,
                    )
                    statuses.append(status)
                    shadow[sector * 512 : sector * 512 + len(data)] = data
                    gpa += 16 + len(data) + 1
            for q in (0, 1):
                s.kick(q)
            for q in (0, 1):
                assert len(s.wait_used(q, 8)) == 8
            assert all(s.get(at, 1) == b"\0" for at in statuses)
            statuses.clear()
        for i in range(60):
            sector = rnd.randrange(0, 4 * MiB // 512 - 64)
            n = rnd.randrange(1, 64) * 512
            op = i % 6
            if op in (0, 1, 2):
                data = rnd.randbytes(n)
                assert s.request(0, VIRTIO_BLK_T_OUT, sector, data=data).ok
                shadow[sector * 512 : sector * 512 + n] = data
            elif op == 3:
                seg = DWZ_SEG.pack(sector, n // 512, rnd.randrange(2))
                assert s.request(0, VIRTIO_BLK_T_WRITE_ZEROES, 0, data=seg).ok
                shadow[sector * 512 : sector * 512 + n] = bytes(n)
            elif op == 4:
                got = s.request(0, VIRTIO_BLK_T_IN, sector, read_len=n)
                assert got.ok and got.data == shadow[sector * 512 : sector * 512 + n]
            else:
                # Discard whole 4 KiB clusters only: the contract leaves partial ones be.
                first = sector // 8 * 8
                seg = DWZ_SEG.pack(first, 16, 0)
                assert s.request(0, VIRTIO_BLK_T_DISCARD, 0, data=seg).ok
                shadow[first * 512 : first * 512 + 8192] = bytes(8192)
        assert s.request(0, VIRTIO_BLK_T_FLUSH, 0).ok
    assert_clean(img)
    _assert_same(img, bytes(shadow), tmp_path)


def test_stale_bitmap_extension_dropped(tmp_path: Path, memory: GuestMemory) -> None:
    """A bitmaps extension whose autoclear bit another program cleared: QEMU ignores it
    (and warns); a writer drops it, leaving the leaks for ``qemu-img check -r leaks``."""
    img = tmp_path / "stale.qcow2"
    qemu_img("create", "-f", "qcow2", img, "1M")
    qemu_img("bitmap", "--add", img, "b0")
    qemu_io(img, "write -P 0x62 0 128k")
    data = bytearray(img.read_bytes())
    data[88:96] = bytes(8)
    img.write_bytes(bytes(data))
    assert "lacking bitmap support" in qemu_img("check", img, check=False).stderr
    disk = QcowDisk.open(str(img), read_only=False)
    disk.close()
    proc = qemu_img("check", img, check=False)
    assert "bitmap" not in proc.stderr, proc.stderr
    qemu_img("check", "-r", "leaks", img)
    assert_clean(img)
    assert as_raw(img, tmp_path / "s.raw")[: 128 * 1024] == b"\x62" * 128 * 1024


def test_qemu_layout_refcount_table_moves(tmp_path: Path, memory: GuestMemory) -> None:
    """512-byte clusters on qemu-img's own layout: 10 MiB of writes outgrow the one-cluster
    refcount table (8 MiB of clusters); qemu-io then allocates through our moved table."""
    img = tmp_path / "grow.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=512", img, "16M")
    reftable = int.from_bytes(img.read_bytes()[48:56], "big")
    chunk = random.Random(15).randbytes(2 * MiB)
    disk = QcowDisk.open(str(img), read_only=False)
    try:
        for i in range(5):
            guest_write(disk, memory, i * 2 * MiB + 512, chunk[: 2 * MiB - 1024])
    finally:
        disk.close()
    header = img.read_bytes()[48:60]
    assert int.from_bytes(header[:8], "big") != reftable
    assert int.from_bytes(header[8:], "big") > 1
    assert_clean(img)
    _qemu_io_on_top(img, tmp_path, 16 * MiB)


def test_huge_virtual_size_writes_at_the_end(tmp_path: Path, memory: GuestMemory) -> None:
    img = tmp_path / "huge.qcow2"
    size = 4 << 40
    qemu_img("create", "-f", "qcow2", img, str(size))
    tail = size - 65536 - 1024
    disk = QcowDisk.open(str(img), read_only=False)
    try:
        guest_write(disk, memory, tail, b"\x65" * (size - tail))
        guest_write(disk, memory, 0, b"\x73" * 4096)
        disk.write_zeroes(size - 512, 512, unmap=True)
    finally:
        disk.close()
    assert_clean(img)
    qemu_io(img, f"read -P 0x65 {tail} {size - tail - 512}", f"read -P 0 {size - 512} 512")
    qemu_io(img, f"write -P 0x66 {size - 4096} 4096")
    disk = QcowDisk.open(str(img), read_only=True)
    try:
        assert guest_read(disk, memory, size - 8192, 8192) == b"\x65" * 4096 + b"\x66" * 4096
        assert guest_read(disk, memory, 0, 4608) == b"\x73" * 4096 + bytes(512)
    finally:
        disk.close()


def test_extensions_without_keeps_the_others(tmp_path: Path) -> None:
    (tmp_path / "b.raw").write_bytes(bytes(MiB))
    img = tmp_path / "e.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "b.raw", "-F", "raw", img, "1M")
    qemu_img("bitmap", "--add", img, "b0")
    data = bytearray(img.read_bytes()[:65536])
    h = parse_header(bytes(data), img.stat().st_size)
    assert EXT_BITMAPS in h.extension_types and h.bitmaps is not None
    area = extensions_without(bytes(data), h, EXT_BITMAPS)
    data[h.header_length : h.header_length + len(area)] = area
    h2 = parse_header(bytes(data), img.stat().st_size)
    assert h2.extension_types == tuple(t for t in h.extension_types if t != EXT_BITMAPS)
    assert (h2.backing_file, h2.backing_format, h2.bitmaps) == ("b.raw", "raw", None)
    # Nothing to drop: the area comes back as it was.
    same = extensions_without(bytes(data), h2, EXT_BITMAPS)
    assert bytes(data[h2.header_length : h2.header_length + len(same)]) == same


def test_writeback_forced_by_dirty_and_free_limits(tmp_path: Path) -> None:
    """Without a guest flush: 16 MiB of dirty 512-byte L2 tables, then over 4096 queued
    frees, each force a writeback mid-workload; both leave images qemu reads right."""
    img = tmp_path / "wide.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=512", img, str(1100 * MiB))
    sector = memoryview(bytearray(b"q" * 512))
    disk = QcowDisk.open(str(img), read_only=False)
    try:
        for i in range(33_500):  # one write per L2 table (each maps 32 KiB)
            disk._write_vecs(i * 32768 + 512 * (i % 64), [sector])
        with open(img, "rb") as f:
            f.seek(40)
            f.seek(int.from_bytes(f.read(8), "big"))
            assert any(f.read(8 * 1024)), "no writeback before the flush"
    finally:
        disk.close()
    assert_clean(img)
    last = 33_499 * 32768 + 512 * (33_499 % 64)
    qemu_io(img, "read -P 0x71 0 512", f"read -P 0x71 {last} 512", "read -P 0 512 512")

    img = tmp_path / "holes.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", img, "48M")
    qemu_io(img, "write -P 0x21 0 48M")
    used = img.stat().st_blocks
    disk = QcowDisk.open(str(img), read_only=False)
    try:
        for c in range(0, 48 * MiB // 4096, 2):
            disk.discard(c * 4096, 4096)
        assert img.stat().st_blocks < used, "no frees before the flush"
    finally:
        disk.close()
    assert_clean(img)
    qemu_io(
        img, "read -P 0 0 4096", "read -P 0x21 4096 4096", f"read -P 0x21 {48 * MiB - 4096} 4096"
    )


_BITMAP_IMAGE: list[tuple[bytes, list[tuple[int, int]]]] = []


def _bitmap_image() -> tuple[bytes, list[tuple[int, int]]]:
    """A small image with two persistent bitmaps holding data, and the byte ranges of its
    bitmap metadata (extension, directory, tables)."""
    if not _BITMAP_IMAGE:
        with tempfile.TemporaryDirectory() as d:
            img = Path(d, "bm.qcow2")
            qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", img, "1M")
            qemu_img("bitmap", "--add", img, "b0")
            qemu_img("bitmap", "--add", "-g", "4096", img, "b1")
            qemu_io(img, "write -P 1 0 512k")
            data = img.read_bytes()
        h = parse_header(data[:4096], len(data))
        assert h.bitmaps is not None
        nb, dir_size, dir_offset = h.bitmaps
        pos = h.header_length
        while EXTENSION.unpack_from(data, pos)[0] != EXT_BITMAPS:
            pos += 8 + ((EXTENSION.unpack_from(data, pos)[1] + 7) & ~7)
        ranges = [(pos + 8, 24), (dir_offset, dir_size)]
        entry = dir_offset
        for _ in range(nb):
            table, size, _, _, _, name, extra = BITMAP_DIR_ENTRY.unpack_from(data, entry)
            ranges.append((table, 8 * size))
            entry += BITMAP_DIR_ENTRY.size + name + extra
            entry += -entry % 8
        _BITMAP_IMAGE.append((data, ranges))
    return _BITMAP_IMAGE[0]


def _consistent(img: Path) -> bool:
    """qemu-img opens the image and finds no corruption (leaks allowed)."""
    proc = qemu_img("check", "--output=json", img, check=False)
    if proc.returncode not in (0, 3):
        return False
    report = json.loads(proc.stdout)
    return bool(report.get("corruptions", 0) == 0 and report.get("check-errors", 0) == 0)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    edits=st.lists(
        st.tuples(st.integers(0, 1 << 16), st.binary(min_size=1, max_size=8)),
        min_size=1,
        max_size=4,
    )
)
def test_hostile_bitmap_metadata_never_corrupts(edits: list[tuple[int, bytes]]) -> None:
    """Garbled bitmap metadata: opening writable raises only project errors, and an image
    qemu-img finds consistent stays consistent after we drop its bitmaps (what does not
    validate is left to leak, never freed)."""
    base, ranges = _bitmap_image()
    data = bytearray(base)
    for where, chunk in edits:
        start, length = ranges[where % len(ranges)]
        at = start + (where >> 4) % length
        piece = chunk[: start + length - at]
        data[at : at + len(piece)] = piece
    with tempfile.TemporaryDirectory() as d:
        img = Path(d, "h.qcow2")
        img.write_bytes(bytes(data))
        consistent = _consistent(img)
        try:
            disk = QcowDisk.open(str(img), read_only=False)
        except BlkdevError:
            return
        try:
            disk._write_vecs(0, [memoryview(bytearray(b"w" * 8192))])
        except BlkdevError:
            pass
        finally:
            disk.close()
        if consistent:
            assert _consistent(img), qemu_img("check", img, check=False).stdout
            assert "bitmap" not in qemu_img("check", img, check=False).stderr


def test_server_refuses_with_remedy_then_serves_read_only(tmp_path: Path) -> None:
    img = tmp_path / "snap.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", img, "1M")
    qemu_io(img, "write -P 0x71 0 64k")
    qemu_img("snapshot", "-c", "s1", img)
    qemu_io(img, "write -P 0x72 4096 4096")
    proc = subprocess.run(
        _serve_args(img, str(tmp_path / "no.sock"), ()),
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode != 0
    assert "internal snapshot" in proc.stderr and f"qemu-img snapshot -d NAME {img}" in proc.stderr
    before = img.read_bytes()
    with _serve(img, tmp_path, "--read-only") as sock, BlkSession.open(sock) as s:
        got = s.request(0, VIRTIO_BLK_T_IN, 0, read_len=12288)
        assert got.ok and got.data == b"\x71" * 4096 + b"\x72" * 4096 + b"\x71" * 4096
        assert not s.request(0, VIRTIO_BLK_T_OUT, 0, data=bytes(512)).ok
    assert img.read_bytes() == before


@pytest.mark.parametrize("cluster_size", [512, 2 * MiB])
def test_scattered_guest_buffers_over_backing(tmp_path: Path, cluster_size: int) -> None:
    """Requests whose guest buffers are several pieces with unaligned interior boundaries
    (as descriptor chains give them), over a raw backing file shorter than the overlay."""
    rnd = random.Random(cluster_size)
    base = tmp_path / "b.raw"
    base.write_bytes(rnd.randbytes(3 * MiB))
    img = tmp_path / "sg.qcow2"
    qemu_img(
        "create",
        "-f",
        "qcow2",
        "-o",
        f"cluster_size={cluster_size}",
        "-b",
        "b.raw",
        "-F",
        "raw",
        img,
        "5M",
    )
    shadow = bytearray(base.read_bytes() + bytes(2 * MiB))
    with GuestMemory.allocate(8 * MiB) as mem:
        disk = QcowDisk.open(str(img), read_only=False)
        try:
            for _ in range(150):
                n = min(rnd.randrange(1, 2 * cluster_size // 512 + 5) * 512, 2 * MiB)
                off = rnd.randrange(0, (5 * MiB - n) // 512 + 1) * 512
                cuts = sorted(rnd.sample(range(1, n), 4))
                pieces: list[tuple[int, int]] = []
                gpa = 0
                for a, b in zip([0, *cuts], [*cuts, n], strict=True):
                    gpa = rnd.randrange(gpa, gpa + 4096)
                    pieces.append((gpa, b - a))
                    gpa += b - a + 1
                if rnd.random() < 0.6:
                    data = rnd.randbytes(n)
                    pos = 0
                    for g, k in pieces:
                        mem.write_at(g, data[pos : pos + k])
                        pos += k
                    disk.write(off, request_buffers_from_buffers(mem, pieces, False))
                    shadow[off : off + n] = data
                else:
                    disk.read(off, request_buffers_from_buffers(mem, pieces, True))
                    got = b"".join(mem.read_at(g, k) for g, k in pieces)
                    assert got == shadow[off : off + n]
        finally:
            disk.close()
    assert_clean(img)
    _assert_same(img, bytes(shadow), tmp_path)
