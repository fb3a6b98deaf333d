"""Growing a qcow2 image while it is open: qemu-img (the oracle) finds it clean, with the new
virtual size, the old data in place and new writes past the old end; a crash between the
steps of an L1 move leaves a consistent image."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from blkdev.disks.qcow import QcowDisk
from blkdev.errors import ResizeRefused
from memory import GuestMemory
from tests.qcow.helpers import MiB, assert_clean, guest_read, guest_write, qemu_check, qemu_img


@pytest.fixture(scope="module")
def memory() -> Iterator[GuestMemory]:
    with GuestMemory.allocate(4 * MiB) as mem:
        yield mem


def _info(img: Path) -> dict[str, object]:
    out = qemu_img("info", "--output=json", img).stdout
    info: dict[str, object] = json.loads(out)
    return info


def _compare(img: Path, shadow: bytes, tmp_path: Path) -> None:
    raw = tmp_path / "shadow.raw"
    raw.write_bytes(shadow)
    proc = qemu_img("compare", "-f", "qcow2", "-F", "raw", img, raw, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# 512-byte clusters: one L1 entry covers 32 KiB, so growing 64 KiB -> 8 MiB moves the L1
# table from 16 bytes to two clusters; 64 KiB clusters: one entry covers 512 MiB, so the same
# grow only rewrites the size.
@pytest.mark.parametrize("cluster_size", [512, 65536])
def test_grow_keeps_data_and_serves_the_new_end(
    tmp_path: Path, memory: GuestMemory, cluster_size: int
) -> None:
    img = tmp_path / "g.qcow2"
    old, new = 64 * 1024, 8 * MiB
    qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", img, str(old))
    rnd = random.Random(cluster_size)
    shadow = bytearray(new)
    disk = QcowDisk.open(str(img), read_only=False)
    try:
        head = rnd.randbytes(old)
        guest_write(disk, memory, 0, head)
        shadow[:old] = head
        # Left dirty on purpose: the resize must write it back before the L1 moves.
        disk.resize(new)
        assert disk.size == new
        assert guest_read(disk, memory, 0, old) == head
        assert guest_read(disk, memory, new - 4096, 4096) == bytes(4096)
        tail = rnd.randbytes(64 * 1024)
        guest_write(disk, memory, new - len(tail), tail)
        shadow[new - len(tail) :] = tail
        mid = rnd.randbytes(8192)
        guest_write(disk, memory, 3 * MiB, mid)
        shadow[3 * MiB : 3 * MiB + len(mid)] = mid
        disk.flush()
    finally:
        disk.close()
    assert _info(img)["virtual-size"] == new
    assert_clean(img)
    _compare(img, bytes(shadow), tmp_path)


def test_grow_twice_and_reopen(tmp_path: Path, memory: GuestMemory) -> None:
    img = tmp_path / "t.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=512", img, "32K")
    disk = QcowDisk.open(str(img), read_only=False)
    try:
        guest_write(disk, memory, 0, b"a" * 512)
        disk.resize(1 * MiB)
        guest_write(disk, memory, 1 * MiB - 512, b"b" * 512)
        disk.resize(4 * MiB)
        guest_write(disk, memory, 4 * MiB - 512, b"c" * 512)
    finally:
        disk.close()
    assert_clean(img)
    disk = QcowDisk.open(str(img), read_only=True)
    try:
        assert disk.size == 4 * MiB
        assert guest_read(disk, memory, 0, 512) == b"a" * 512
        assert guest_read(disk, memory, 1 * MiB - 512, 512) == b"b" * 512
        assert guest_read(disk, memory, 4 * MiB - 512, 512) == b"c" * 512
    finally:
        disk.close()


def test_refused_resizes_change_nothing(tmp_path: Path) -> None:
    img = tmp_path / "r.qcow2"
    qemu_img("create", "-f", "qcow2", img, "1M")
    before = img.read_bytes()
    disk = QcowDisk.open(str(img), read_only=False)
    try:
        with pytest.raises(ResizeRefused, match="shrinking a qcow2 image is not supported"):
            disk.resize(512 * 1024, force=True)
        with pytest.raises(ResizeRefused, match="multiple of 512"):
            disk.resize(2 * MiB + 1)
        disk.resize(1 * MiB)  # the same size: nothing to do
        assert disk.size == 1 * MiB
    finally:
        disk.close()
    assert img.read_bytes() == before
    ro = QcowDisk.open(str(img), read_only=True)
    try:
        with pytest.raises(ResizeRefused, match="read-only"):
            ro.resize(2 * MiB)
    finally:
        ro.close()


class _Crash(BaseException):
    """Stands for the process dying: raised instead of the ``stop``-th write to the file."""


def test_a_crash_at_any_write_of_an_l1_move_leaves_a_consistent_image(
    tmp_path: Path, memory: GuestMemory
) -> None:
    """The file is left as the writes before the crash made it (the page cache keeps them,
    as a killed process's would); every prefix must be a consistent image of the old or the
    new size, with the written data, at worst leaking clusters."""
    old, new = 64 * 1024, 8 * MiB
    data = random.Random(5).randbytes(old)
    stop = 0
    while True:
        img = tmp_path / f"c{stop}.qcow2"
        qemu_img("create", "-f", "qcow2", "-o", "cluster_size=512", img, str(old))
        disk = QcowDisk.open(str(img), read_only=False)
        guest_write(disk, memory, 0, data)
        disk.flush()
        file = disk._file
        file.pwrite = _crashing(file.pwrite, stop)  # type: ignore[method-assign]
        try:
            disk.resize(new)
            done = True
        except _Crash:
            done = False
        os_close_without_writeback(disk)
        report = qemu_check_allowing_leaks(img)
        size = _info(img)["virtual-size"]
        assert size in (old, new), (stop, size)
        if done:
            assert size == new
        check = QcowDisk.open(str(img), read_only=True)
        try:
            assert guest_read(check, memory, 0, old) == data, stop
        finally:
            check.close()
        assert report["corruptions"] == 0, (stop, report)
        if done:
            break
        stop += 1
    assert stop >= 3  # the L1 move really had steps to cut between


def _crashing(
    real: Callable[[int, bytes | bytearray | memoryview], None], stop: int
) -> Callable[[int, bytes | bytearray | memoryview], None]:
    """``real`` for the first ``stop`` writes, then the crash."""
    writes = 0

    def pwrite(offset: int, buf: bytes | bytearray | memoryview) -> None:
        nonlocal writes
        if writes == stop:
            raise _Crash
        writes += 1
        real(offset, buf)

    return pwrite


def os_close_without_writeback(disk: QcowDisk) -> None:
    """Drop the disk as a dead process would: release the fd and lock, write nothing."""
    disk._closed = True
    disk._file.close()


def qemu_check_allowing_leaks(img: Path) -> dict[str, int]:
    report = qemu_check(img)
    return {"corruptions": int(report.get("corruptions", 0)), "leaks": int(report.get("leaks", 0))}
