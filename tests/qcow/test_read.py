"""Reads are byte-exact against ``qemu-img convert -O raw`` for images qemu-img made."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from blkdev.disks import open_disk
from blkdev.disks.qcow import QcowDisk
from blkdev.errors import ImageError
from memory import GuestMemory
from tests.qcow.helpers import MiB, as_raw, guest_read, qemu_img, qemu_io, read_all

SIZE = 6 * MiB


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A raw image mixing compressible text, random data and holes."""
    rnd = random.Random(5)
    data = bytearray(SIZE)
    for i in range(60):
        off = rnd.randrange(0, SIZE - 300 * 1024) // 512 * 512
        n = rnd.randrange(1, 600) * 512
        chunk = (b"line %d of some text\n" % i) * (n // 16 + 1) if i % 2 else os.urandom(n)
        data[off : off + n] = chunk[:n]
    path = tmp_path_factory.mktemp("src") / "src.raw"
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="module")
def memory() -> Iterator[GuestMemory]:
    with GuestMemory.allocate(4 * MiB) as mem:
        yield mem


def _assert_reads_like_qemu(img: Path, tmp_path: Path, mem: GuestMemory | None = None) -> None:
    expected = as_raw(img, tmp_path / "expected.raw")
    disk = QcowDisk.open(str(img), read_only=True)
    try:
        assert disk.size == len(expected)
        assert read_all(disk) == expected
        if mem is not None:
            # Through guest memory, at unaligned cluster-crossing offsets.
            rnd = random.Random(1)
            for _ in range(20):
                off = rnd.randrange(0, disk.size // 512) * 512
                n = min(rnd.randrange(1, 1024) * 512, disk.size - off)
                got = guest_read(disk, mem, off, n, gpa=rnd.randrange(0, 64) * 512)
                assert got == expected[off : off + n]
    finally:
        disk.close()


@pytest.mark.parametrize("cluster_size", [512, 4096, 65536, 2 * MiB])
@pytest.mark.parametrize(
    "options",
    [
        [],
        ["-c"],
        ["-o", "compat=0.10"],
        ["-c", "-o", "compression_type=zstd"],
        ["-o", "refcount_bits=1"],
        ["-o", "refcount_bits=64"],
    ],
    ids=["plain", "deflate", "v2", "zstd", "rc1", "rc64"],
)
def test_converted_images(
    source: Path, tmp_path: Path, memory: GuestMemory, cluster_size: int, options: list[str]
) -> None:
    img = tmp_path / "a.qcow2"
    qemu_img(
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        f"cluster_size={cluster_size}",
        *options,
        source,
        img,
    )
    _assert_reads_like_qemu(img, tmp_path, memory if cluster_size == 4096 else None)


@pytest.mark.parametrize("prealloc", ["metadata", "falloc", "full"])
def test_preallocation(tmp_path: Path, prealloc: str) -> None:
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"preallocation={prealloc}", img, "3M")
    qemu_io(img, "write -P 0x11 65536 4096", "write -z 131072 65536")
    _assert_reads_like_qemu(img, tmp_path)


def test_zero_clusters_both_kinds(tmp_path: Path, memory: GuestMemory) -> None:
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-f", "qcow2", img, "2M")
    qemu_io(
        img,
        "write -P 0x42 0 2M",
        "write -z 65536 65536",  # keeps the allocation: zero flag + offset
        "write -z -u 262144 131072",  # deallocates: zero flag alone
        "discard 524288 65536",
    )
    _assert_reads_like_qemu(img, tmp_path, memory)


def test_zero_clusters_over_backing(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-f", "qcow2", base, "2M")
    qemu_io(base, "write -P 0x61 0 2M")
    img = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", img)
    qemu_io(img, "write -z 65536 65536", "write -z -u 262144 131072", "write -P 3 1024 512")
    _assert_reads_like_qemu(img, tmp_path)


def test_backing_chain(source: Path, tmp_path: Path, memory: GuestMemory) -> None:
    """raw <- compressed qcow2 <- qcow2 (relative names) <- smaller-then-grown qcow2."""
    sub = tmp_path / "sub"
    sub.mkdir()
    raw = sub / "base.raw"
    raw.write_bytes(source.read_bytes()[: 4 * MiB])
    mid = sub / "mid.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "base.raw", "-F", "raw", mid)
    qemu_io(mid, "write -P 0x77 100000 300000")
    mid2 = sub / "mid2.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-B", "base.raw", "-F", "raw", mid, mid2)
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "sub/mid2.qcow2", "-F", "qcow2", top, "8M")
    qemu_io(top, "write -P 0x99 3M 70000", "write -z 2M 131072")
    _assert_reads_like_qemu(top, tmp_path, memory)
    info = open_disk(str(top), fmt="qcow2", read_only=True)
    try:
        assert info.size == 8 * MiB
    finally:
        info.close()


def test_backing_errors(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-f", "qcow2", base, "1M")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    # A probed qcow2 must not follow its backing file.
    with pytest.raises(ImageError, match="--format qcow2"):
        QcowDisk.open(str(top), read_only=True, allow_backing=False)
    with pytest.raises(ImageError, match="--format qcow2"):
        open_disk(str(top), fmt="auto", read_only=True)
    # The format is never guessed.
    qemu_img("rebase", "-u", "-b", "base.qcow2", top, check=False)
    unnamed = tmp_path / "unnamed.qcow2"
    data = bytearray(top.read_bytes())
    data[112:116] = bytes(4)  # turn the backing-format extension into the end marker
    unnamed.write_bytes(bytes(data))
    with pytest.raises(ImageError, match="never"):
        QcowDisk.open(str(unnamed), read_only=True)
    base.unlink()
    with pytest.raises(ImageError, match="does not exist"):
        QcowDisk.open(str(top), read_only=True)


def test_backing_loop_hits_depth_limit(tmp_path: Path) -> None:
    a = tmp_path / "a.qcow2"
    b = tmp_path / "b.qcow2"
    qemu_img("create", "-f", "qcow2", a, "1M")
    qemu_img("create", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", b)
    qemu_img("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", a)
    with pytest.raises(ImageError, match="backing chain longer"):
        QcowDisk.open(str(b), read_only=True)


def test_shorter_backing_reads_zeros_past_its_end(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\xee" * 5000)
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", top, "1M")
    _assert_reads_like_qemu(top, tmp_path)
