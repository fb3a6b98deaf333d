"""RawDisk on a real block device: a loop device with 4 KiB logical sectors.

This covers the block-device paths (BLKGETSIZE64, BLKDISCARD, BLKZEROOUT) and, with
``cache="none"``, O_DIRECT on storage whose block is bigger than a virtio sector, where
sector-sized guest requests go through read-modify-write bounce buffers.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from blkdev.disks.raw import RawDisk
from memory import GuestMemory, request_buffers_from_buffers

SIZE = 4 << 20


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    backing = tmp_path / "backing.img"
    backing.write_bytes(os.urandom(SIZE))
    dev = subprocess.run(
        ["losetup", "--find", "--show", "--sector-size", "4096", str(backing)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    try:
        yield dev, backing
    finally:
        subprocess.run(["losetup", "--detach", dev], check=True)


def backing_bytes(backing: Path) -> bytes:
    return backing.read_bytes()


@pytest.mark.parametrize("cache", ["writeback", "none"])
def test_block_device(loop_device: tuple[str, Path], cache: str) -> None:
    dev, backing = loop_device
    expected = bytearray(backing.read_bytes())
    disk = RawDisk.open(dev, cache=cache)  # type: ignore[arg-type]
    try:
        assert disk.size == SIZE
        with GuestMemory.allocate(4 << 20) as mem:
            # 512-byte pieces at odd guest addresses, at a sector that is not 4 KiB aligned.
            segs = [(0x1001, 512), (0x3203, 1024)]
            mem.write_at(0x1001, b"\x11" * 512)
            mem.write_at(0x3203, b"\x22" * 1024)
            disk.write(512 * 3, request_buffers_from_buffers(mem, segs, False))
            expected[1536 : 1536 + 1536] = b"\x11" * 512 + b"\x22" * 1024

            out = [(0x8000, 4096 * 4)]
            disk.read(0, request_buffers_from_buffers(mem, out, True))
            assert mem.read_at(0x8000, 4096 * 4) == expected[: 4096 * 4]
            odd = [(0x20005, 1536)]
            disk.read(512, request_buffers_from_buffers(mem, odd, True))
            assert mem.read_at(0x20005, 1536) == expected[512:2048]

            disk.write_zeroes(8192, 8192, unmap=False)
            expected[8192:16384] = bytes(8192)
            disk.write_zeroes(512 * 33, 1024, unmap=True)  # part of a 4 KiB block
            expected[512 * 33 : 512 * 35] = bytes(1024)
            disk.discard(1 << 20, 1 << 20)  # may or may not zero: read it back
            disk.read(1 << 20, request_buffers_from_buffers(mem, [(1 << 20, 1 << 20)], True))
            expected[1 << 20 : 2 << 20] = mem.read_at(1 << 20, 1 << 20)
            disk.flush()
    finally:
        disk.close()
    with open(dev, "rb") as f:
        assert f.read(SIZE)[: len(expected)] == bytes(expected)


def test_concurrent_sector_writes_into_one_block_keep_each_other(
    loop_device: tuple[str, Path],
) -> None:
    # Eight threads each rewrite their own 512-byte sector of the same 4 KiB block through
    # read-modify-write bounces; none may undo another's write.
    dev, _ = loop_device
    disk = RawDisk.open(dev, cache="none")
    try:
        with GuestMemory.allocate(1 << 16) as mem:

            def worker(i: int) -> None:
                gpa = 0x1000 * (i + 1) + 1
                for round_ in range(30):
                    mem.write_at(gpa, bytes([i * 30 + round_]) * 512)
                    disk.write(i * 512, request_buffers_from_buffers(mem, [(gpa, 512)], False))

            threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
                assert not t.is_alive(), "a worker thread hung"
            disk.read(0, request_buffers_from_buffers(mem, [(0xA000, 4096)], True))
            got = mem.read_at(0xA000, 4096)
    finally:
        disk.close()
    assert got == b"".join(bytes([i * 30 + 29]) * 512 for i in range(8))
