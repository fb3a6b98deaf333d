"""Writes through QcowDisk: qemu-img check finds the image clean and compare finds it equal
to a raw shadow that saw the same operations."""

from __future__ import annotations

import errno
import os
import random
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from blkdev.disks.qcow import QcowDisk, create_image, image_info
from blkdev.errors import DiskIOError, ImageCorruptError
from memory import GuestMemory
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


def _assert_same(img: Path, shadow: bytes, tmp_path: Path) -> None:
    raw = tmp_path / "shadow.raw"
    raw.write_bytes(shadow)
    proc = qemu_img("compare", "-f", "qcow2", "-F", "raw", img, raw, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _workload(
    disk: QcowDisk, mem: GuestMemory, shadow: bytearray, seed: int, ops: int, cs: int
) -> None:
    rnd = random.Random(seed)
    size = disk.size
    for _ in range(ops):
        off = rnd.randrange(0, size // 512) * 512
        n = min(rnd.randrange(1, 2 * cs // 512 + 8) * 512, size - off, 2 * MiB)
        op = rnd.random()
        if op < 0.55:
            data = rnd.randbytes(n)
            guest_write(disk, mem, off, data, gpa=rnd.randrange(0, 16) * 4096)
            shadow[off : off + n] = data
        elif op < 0.7:
            disk.discard(off, n)
            a, b = -(-off // cs) * cs, (off + n) // cs * cs
            if b > a:  # whole clusters read as zeros after a discard, partial ones unchanged
                shadow[a:b] = bytes(b - a)
        elif op < 0.85:
            disk.write_zeroes(off, n, unmap=rnd.random() < 0.5)
            shadow[off : off + n] = bytes(n)
        elif op < 0.9:
            disk.flush()
        else:
            assert guest_read(disk, mem, off, n) == shadow[off : off + n]


@pytest.mark.parametrize("cluster_size", [512, 4096, 65536])
@pytest.mark.parametrize("backing", ["none", "qcow2", "raw"])
@pytest.mark.parametrize("creator", ["qemu-img", "ours"])
def test_random_workload(
    tmp_path: Path, memory: GuestMemory, cluster_size: int, backing: str, creator: str
) -> None:
    size = 4 * MiB
    img = tmp_path / "t.qcow2"
    shadow = bytearray(size)
    backing_args: list[str] = []
    if backing != "none":
        base_data = random.Random(9).randbytes(size - 64 * 1024)  # shorter than the overlay
        shadow[: len(base_data)] = base_data
        base_raw = tmp_path / "base.raw"
        base_raw.write_bytes(base_data)
        name = "base.raw"
        if backing == "qcow2":
            name = "base.qcow2"
            qemu_img(
                "convert", "-c", "-O", "qcow2", "-o", "cluster_size=4096", base_raw, tmp_path / name
            )
        backing_args = ["-b", name, "-F", backing]
    if creator == "ours":
        create_image(
            str(img),
            size,
            cluster_size=cluster_size,
            backing_file=backing_args[1] if backing_args else None,
            backing_format=backing_args[3] if backing_args else None,
        )
    else:
        qemu_img(
            "create",
            "-f",
            "qcow2",
            "-o",
            f"cluster_size={cluster_size}",
            *backing_args,
            img,
            str(size),
        )
    base_before = (tmp_path / "base.qcow2").read_bytes() if backing == "qcow2" else b""
    disk = QcowDisk.open(str(img), read_only=False)
    try:
        _workload(disk, memory, shadow, seed=cluster_size, ops=250, cs=cluster_size)
    finally:
        disk.close()
    assert_clean(img)
    _assert_same(img, bytes(shadow), tmp_path)
    if backing == "qcow2":
        assert (tmp_path / "base.qcow2").read_bytes() == base_before


def test_overwrite_compressed_clusters(tmp_path: Path, memory: GuestMemory) -> None:
    raw = tmp_path / "a.raw"
    text = b"".join(b"compressible line %06d\n" % i for i in range(100_000))[: 2 * MiB]
    raw.write_bytes(text)
    img = tmp_path / "a.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", raw, img)
    compressed_size = img.stat().st_size
    shadow = bytearray(text)
    disk = QcowDisk.open(str(img), read_only=False)
    try:
        for off, n in [(512, 512), (65536, 65536), (200_000 // 512 * 512, 4096), (MiB, MiB)]:
            data = os.urandom(n)
            guest_write(disk, memory, off, data)
            shadow[off : off + n] = data
        disk.write_zeroes(3 * 65536, 65536, unmap=False)
        shadow[3 * 65536 : 4 * 65536] = bytes(65536)
        assert read_all(disk) == shadow
    finally:
        disk.close()
    assert_clean(img)
    _assert_same(img, bytes(shadow), tmp_path)
    assert img.stat().st_size > compressed_size


def test_refcount_table_and_block_growth(tmp_path: Path) -> None:
    """512-byte clusters: a refcount block covers 128 KiB and a one-cluster table 8 MiB, so
    12 MiB of writes need new blocks and a moved, larger refcount table."""
    img = tmp_path / "g.qcow2"
    create_image(str(img), 16 * MiB, cluster_size=512)
    disk = QcowDisk.open(str(img), read_only=False)
    chunk = random.Random(3).randbytes(256 * 1024)
    try:
        for i in range(48):
            disk._write_vecs(i * len(chunk), [memoryview(bytearray(chunk))])
            if i % 16 == 15:
                disk.flush()
    finally:
        disk.close()
    with open(img, "rb") as f:
        f.seek(56)
        (reftable_clusters,) = struct.unpack(">I", f.read(4))
    assert reftable_clusters > 1
    assert_clean(img)
    _assert_same(img, chunk * 48 + bytes(4 * MiB), tmp_path)


def test_freed_clusters_are_reused_after_flush(tmp_path: Path) -> None:
    img = tmp_path / "r.qcow2"
    create_image(str(img), 8 * MiB)
    disk = QcowDisk.open(str(img), read_only=False)
    try:
        disk._write_vecs(0, [memoryview(bytearray(b"a" * (2 * MiB)))])
        disk.flush()
        grown = img.stat().st_size
        disk.discard(0, 2 * MiB)
        disk.flush()
        disk._write_vecs(4 * MiB, [memoryview(bytearray(b"b" * (2 * MiB)))])
        disk.flush()
        assert img.stat().st_size <= grown + 65536
        disk.discard(4 * MiB, 2 * MiB)
        disk.flush()
        # The freed clusters' host space went back to the file system.
        assert img.stat().st_blocks * 512 < MiB
    finally:
        disk.close()
    assert_clean(img)


def test_data_write_onto_metadata_marks_corrupt(tmp_path: Path, memory: GuestMemory) -> None:
    img = tmp_path / "c.qcow2"
    qemu_img("create", "-f", "qcow2", img, "1M")
    qemu_io(img, "write -P 1 0 64k")
    data = bytearray(img.read_bytes())
    l1_offset = struct.unpack_from(">Q", data, 40)[0]
    l2_offset = struct.unpack_from(">Q", data, l1_offset)[0] & 0x00FFFFFFFFFFFE00
    reftable = struct.unpack_from(">Q", data, 48)[0]
    # Point guest cluster 1 at the refcount table.
    struct.pack_into(">Q", data, l2_offset + 8, reftable | 1 << 63)
    img.write_bytes(bytes(data))
    before = img.read_bytes()[reftable : reftable + 65536]
    disk = QcowDisk.open(str(img), read_only=False)
    try:
        with pytest.raises(ImageCorruptError, match="metadata"):
            guest_write(disk, memory, 65536, b"x" * 4096)
        with pytest.raises(ImageCorruptError):
            guest_write(disk, memory, 0, b"y" * 512)
        assert guest_read(disk, memory, 0, 512) == b"\x01" * 512
    finally:
        disk.close()
    assert img.read_bytes()[reftable : reftable + 65536] == before
    assert image_info(str(img))["format-specific"]["data"]["corrupt"] is True


def test_concurrent_writers(tmp_path: Path) -> None:
    img = tmp_path / "mt.qcow2"
    create_image(str(img), 8 * MiB, cluster_size=4096)
    shadow = bytearray(8 * MiB)
    disk = QcowDisk.open(str(img), read_only=False)
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        rnd = random.Random(k)
        try:
            for _ in range(150):
                # Each thread owns every fourth 64 KiB stripe.
                stripe = rnd.randrange(0, 32) * 4 + k
                off = stripe * 65536 + rnd.randrange(0, 120) * 512
                n = min(rnd.randrange(1, 9) * 512, (stripe + 1) * 65536 - off)
                op = rnd.random()
                if op < 0.7:
                    data = rnd.randbytes(n)
                    disk._write_vecs(off, [memoryview(bytearray(data))])
                    shadow[off : off + n] = data
                elif op < 0.8:
                    disk.write_zeroes(stripe * 65536, 65536, unmap=True)
                    shadow[stripe * 65536 : (stripe + 1) * 65536] = bytes(65536)
                elif op < 0.9:
                    disk.flush()
                else:
                    buf = bytearray(n)
                    disk.read_vecs(off, [memoryview(buf)])
                    assert buf == shadow[off : off + n]
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "a worker thread hung"
    disk.close()
    assert not errors, errors
    assert_clean(img)
    _assert_same(img, bytes(shadow), tmp_path)


def test_read_only_and_reopen(tmp_path: Path, memory: GuestMemory) -> None:
    img = tmp_path / "ro.qcow2"
    create_image(str(img), MiB)
    disk = QcowDisk.open(str(img), read_only=False)
    guest_write(disk, memory, 4096, b"persist" * 512 + bytes(512))
    disk.close()
    disk.close()  # idempotent
    disk = QcowDisk.open(str(img), read_only=True)
    try:
        assert not disk.supports_discard and not disk.supports_write_zeroes
        with pytest.raises(ValueError):
            guest_write(disk, memory, 0, bytes(512))
        assert guest_read(disk, memory, 4096, 4096) == (b"persist" * 512 + bytes(512))[:4096]
    finally:
        disk.close()
    assert as_raw(img, tmp_path / "o.raw")[4096 : 4096 + 7] == b"persist"


def test_interoperates_both_ways(tmp_path: Path, memory: GuestMemory) -> None:
    """We write, qemu-io writes on top, we read what qemu-img reads, and write again."""
    img = tmp_path / "i.qcow2"
    create_image(str(img), 2 * MiB, cluster_size=4096)
    shadow = bytearray(2 * MiB)
    disk = QcowDisk.open(str(img), read_only=False)
    try:
        _workload(disk, memory, shadow, seed=11, ops=80, cs=4096)
    finally:
        disk.close()
    qemu_io(img, "write -P 0x3c 10240 70000", "write -z 200k 64k", "discard 1M 256k")
    expected = as_raw(img, tmp_path / "q.raw")
    disk = QcowDisk.open(str(img), read_only=False)
    try:
        assert read_all(disk) == expected
        shadow[:] = expected
        _workload(disk, memory, shadow, seed=12, ops=80, cs=4096)
    finally:
        disk.close()
    assert_clean(img)
    _assert_same(img, bytes(shadow), tmp_path)


def test_refcount_table_stops_at_qemus_limit(tmp_path: Path, memory: GuestMemory) -> None:
    """With 512-byte clusters an 8 MiB refcount table (the most QEMU and parse_header accept)
    covers 128 GiB of file. Growing past it fails the write (EFBIG, IOERR to the guest) and
    leaves the image valid; just below it the table grows. The allocator is pointed at
    100 / 130 GiB so the file stays sparse."""
    img = tmp_path / "cap.qcow2"
    create_image(str(img), 1 << 30, cluster_size=512)
    before = img.read_bytes()
    disk = QcowDisk.open(str(img), read_only=False)
    try:
        assert disk._refcounts is not None
        disk._refcounts.hint = (130 << 30) // 512
        with pytest.raises(DiskIOError, match="full") as err:
            guest_write(disk, memory, 0, b"x" * 512)
        assert err.value.errno == errno.EFBIG
        disk.flush()
    finally:
        disk.close()
    assert img.read_bytes() == before
    assert_clean(img)

    disk = QcowDisk.open(str(img), read_only=False)
    try:
        assert disk._refcounts is not None
        disk._refcounts.hint = (100 << 30) // 512
        guest_write(disk, memory, 0, b"y" * 512)
    finally:
        disk.close()
    with open(img, "rb") as f:
        f.seek(56)
        (reftable_clusters,) = struct.unpack(">I", f.read(4))
    assert 4 * MiB < reftable_clusters * 512 <= 8 * MiB
    assert qemu_img("info", img).returncode == 0
    disk = QcowDisk.open(str(img), read_only=True)
    try:
        assert guest_read(disk, memory, 0, 1024) == b"y" * 512 + bytes(512)
    finally:
        disk.close()


@pytest.mark.parametrize("backing", [False, True])
def test_partial_write_zeroes_allocates_only_where_needed(
    tmp_path: Path, memory: GuestMemory, backing: bool
) -> None:
    """Write-zeroes of part of a cluster that already reads as zeros changes nothing; on an
    allocated cluster it writes zeros in place; only a backing file's data showing through
    (or a compressed cluster) needs a new cluster."""
    cs = 65536
    size = 64 * MiB
    img = tmp_path / "z.qcow2"
    shadow = bytearray(size)
    if backing:
        base = tmp_path / "base.raw"
        base_data = bytearray(size // 2)  # zeros, except clusters 8..15; shorter than the disk
        base_data[8 * cs : 16 * cs] = random.Random(1).randbytes(8 * cs)
        base.write_bytes(bytes(base_data))
        shadow[: len(base_data)] = base_data
        create_image(str(img), size, backing_file="base.raw", backing_format="raw")
    else:
        create_image(str(img), size)
    disk = QcowDisk.open(str(img), read_only=False)
    try:
        guest_write(disk, memory, 2 * cs, b"d" * cs)  # an allocated cluster
        shadow[2 * cs : 3 * cs] = b"d" * cs
        disk.write_zeroes(4 * cs, cs, unmap=False)  # a zero cluster
        shadow[4 * cs : 5 * cs] = bytes(cs)
        disk.flush()
        allocated = img.stat().st_size
        for i in range(size // cs):
            if 8 <= i < 16:
                continue
            disk.write_zeroes(i * cs + 4096, 4096, unmap=i % 2 == 0)
            shadow[i * cs + 4096 : i * cs + 8192] = bytes(4096)
        # Straddling a cluster boundary: the tail of one, the head of the next.
        disk.write_zeroes(5 * cs - 1024, 2048, unmap=True)
        shadow[5 * cs - 1024 : 5 * cs + 1024] = bytes(2048)
        disk.flush()
        assert img.stat().st_size == allocated
        # Backing data showing through: the cluster gets its own copy, zeroed in part.
        disk.write_zeroes(9 * cs + 512, 1024, unmap=True)
        shadow[9 * cs + 512 : 9 * cs + 1536] = bytes(1024)
        disk.flush()
        assert img.stat().st_size == allocated + (cs if backing else 0)
        assert guest_read(disk, memory, 2 * cs, cs) == shadow[2 * cs : 3 * cs]
    finally:
        disk.close()
    assert_clean(img)
    _assert_same(img, bytes(shadow), tmp_path)


def test_partial_write_zeroes_on_compressed_cluster(tmp_path: Path) -> None:
    raw = tmp_path / "a.raw"
    content = b"".join(b"row %d\n" % i for i in range(100_000))[:MiB]
    raw.write_bytes(content)
    img = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", raw, img)
    shadow = bytearray(content)
    disk = QcowDisk.open(str(img), read_only=False)
    try:
        disk.write_zeroes(65536 + 512, 4096, unmap=True)
        shadow[65536 + 512 : 65536 + 4608] = bytes(4096)
    finally:
        disk.close()
    assert_clean(img)
    _assert_same(img, bytes(shadow), tmp_path)
