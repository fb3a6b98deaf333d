"""Writes through QcowDisk: qemu-img check finds the image clean and compare finds it equal
to a raw shadow that saw the same operations."""

from __future__ import annotations

import os
import random
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from blkdev.errors import ImageCorruptError
from blkdev.qcow import QcowDisk, create_image, image_info
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
        t.join()
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
