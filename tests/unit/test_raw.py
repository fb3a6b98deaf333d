"""RawDisk against a real file: data, discard/write-zeroes, O_DIRECT bouncing, open errors."""

from __future__ import annotations

import errno
import itertools
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blkdev.disks import open_disk
from blkdev.disks.hostfile import IOV_MAX
from blkdev.disks.probe import probe_format
from blkdev.disks.raw import RawDisk
from blkdev.errors import DiskIOError, ImageError
from memory import GuestMemory, request_buffers_from_buffers

DISK_SIZE = 64 * 1024
MEM_SIZE = 1024 * 1024


@pytest.fixture(scope="module")
def memory() -> Iterator[GuestMemory]:
    with GuestMemory.allocate(MEM_SIZE) as mem:
        yield mem


def make_image(path: Path, size: int = DISK_SIZE, data: bytes | None = None) -> str:
    with open(path, "wb") as f:
        if data is not None:
            f.write(data)
        f.truncate(size)
    return str(path)


def segments_for(length: int, cuts: list[int], gaps: list[int], base: int) -> list[tuple[int, int]]:
    """Split ``length`` bytes at ``cuts`` and place the pieces at ``base`` with ``gaps``."""
    bounds = [0, *sorted({c for c in cuts if 0 < c < length}), length]
    out, gpa = [], base
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        out.append((gpa, b - a))
        gpa += b - a + (gaps[i % len(gaps)] if gaps else 0)
    return out


def read_disk(disk: RawDisk, memory: GuestMemory, offset: int, length: int) -> bytes:
    buffers = request_buffers_from_buffers(memory, [(0x20000, length)], True)
    disk.read(offset, buffers)
    return memory.read_at(0x20000, length)


op = st.tuples(
    st.sampled_from(["write", "read", "discard", "zeroes", "flush"]),
    st.integers(0, DISK_SIZE // 512 - 1),  # first sector
    st.integers(0, 32),  # sectors
    st.lists(st.integers(1, 16 * 1024), max_size=4),  # cuts in the guest buffer
    st.lists(st.integers(0, 700), min_size=1, max_size=3),  # gaps between pieces
    st.integers(0, 1000),  # guest base offset (unaligned on purpose)
    st.binary(min_size=1, max_size=8),  # data pattern
)


@pytest.mark.parametrize("cache", ["writeback", "none"])
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(ops=st.lists(op, max_size=12))
def test_matches_a_bytearray_model(
    memory: GuestMemory,
    cache: str,
    ops: list[tuple[str, int, int, list[int], list[int], int, bytes]],
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = make_image(Path(tmp) / "disk.raw", data=os.urandom(DISK_SIZE))
        model = bytearray(Path(path).read_bytes())
        disk = RawDisk.open(path, cache=cache)  # type: ignore[arg-type]
        try:
            for kind, sector, count, cuts, gaps, base, pattern in ops:
                offset = sector * 512
                length = min(count * 512, DISK_SIZE - offset)
                segs = segments_for(length, cuts, gaps, base)
                if kind == "write":
                    data = (pattern * (length // len(pattern) + 1))[:length]
                    pos = 0
                    for gpa, n in segs:
                        memory.write_at(gpa, data[pos : pos + n])
                        pos += n
                    disk.write(offset, request_buffers_from_buffers(memory, segs, False))
                    model[offset : offset + length] = data
                elif kind == "read":
                    for gpa, n in segs:
                        memory.write_at(gpa, b"\xee" * n)
                    disk.read(offset, request_buffers_from_buffers(memory, segs, True))
                    got = b"".join(memory.read_at(gpa, n) for gpa, n in segs)
                    assert got == model[offset : offset + length]
                elif kind == "discard":
                    disk.discard(offset, length)
                    model[offset : offset + length] = bytes(length)  # ext4 punches holes
                elif kind == "zeroes":
                    disk.write_zeroes(offset, length, unmap=bool(sector & 1))
                    model[offset : offset + length] = bytes(length)
                else:
                    disk.flush()
            assert read_disk(disk, memory, 0, DISK_SIZE) == model
        finally:
            disk.close()
        assert Path(path).read_bytes() == model


def test_more_than_iov_max_segments(tmp_path: Path, memory: GuestMemory) -> None:
    count = IOV_MAX + 300
    data = os.urandom(count * 512)
    path = make_image(tmp_path / "disk.raw", size=count * 512, data=data)
    segs = [(i * 640, 512) for i in range(count)]  # never adjacent: one vector each
    assert segs[-1][0] + 512 <= MEM_SIZE
    disk = RawDisk.open(path)
    try:
        disk.read(0, request_buffers_from_buffers(memory, segs, True))
        assert b"".join(memory.read_at(g, n) for g, n in segs) == data
        for g, n in segs:
            memory.write_at(g, b"\x5a" * n)
        disk.write(0, request_buffers_from_buffers(memory, segs, False))
        disk.flush()
    finally:
        disk.close()
    assert Path(path).read_bytes() == b"\x5a" * count * 512


def test_punched_hole_reads_zeros_and_frees_space(tmp_path: Path, memory: GuestMemory) -> None:
    path = make_image(tmp_path / "disk.raw", size=1 << 20, data=os.urandom(1 << 20))
    disk = RawDisk.open(path)
    try:
        disk.flush()
        before = os.stat(path).st_blocks
        disk.discard(0, 512 * 1024)
        assert read_disk(disk, memory, 0, 512 * 1024) == bytes(512 * 1024)
        assert os.stat(path).st_blocks < before
        assert os.stat(path).st_size == 1 << 20
        disk.write_zeroes(512 * 1024, 4096, unmap=False)
        assert read_disk(disk, memory, 512 * 1024, 8192)[:4096] == bytes(4096)
    finally:
        disk.close()


def test_truncated_behind_our_back_is_an_io_error(tmp_path: Path, memory: GuestMemory) -> None:
    path = make_image(tmp_path / "disk.raw")
    disk = RawDisk.open(path)
    try:
        os.truncate(path, 4096)
        with pytest.raises(DiskIOError):
            read_disk(disk, memory, 8192, 4096)
    finally:
        disk.close()


def test_misuse_is_a_value_error(tmp_path: Path, memory: GuestMemory) -> None:
    disk = RawDisk.open(make_image(tmp_path / "disk.raw"))
    buffers = request_buffers_from_buffers(memory, [(0, 1024)], True)
    with pytest.raises(ValueError):
        disk.read(DISK_SIZE - 512, buffers)
    with pytest.raises(ValueError):
        disk.read(100, request_buffers_from_buffers(memory, [(0, 512)], True))
    disk.close()
    disk.close()  # idempotent
    with pytest.raises(ValueError):
        disk.read(0, buffers)


def test_read_only_refuses_writes(tmp_path: Path, memory: GuestMemory) -> None:
    disk = RawDisk.open(make_image(tmp_path / "disk.raw"), read_only=True)
    try:
        assert disk.read_only and not disk.supports_discard and not disk.supports_write_zeroes
        with pytest.raises(ValueError):
            disk.write(0, request_buffers_from_buffers(memory, [(0, 512)], False))
    finally:
        disk.close()


# -- open errors ------------------------------------------------------------------------------


def test_size_must_be_whole_sectors(tmp_path: Path) -> None:
    path = make_image(tmp_path / "odd.raw", size=1000)
    with pytest.raises(ImageError, match=r"truncate -s 1024 "):
        open_disk(path)


def test_missing_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="does not exist"):
        open_disk(str(tmp_path / "nope.raw"))
    with pytest.raises(ImageError, match="is a directory"):
        open_disk(str(tmp_path))
    with pytest.raises(ValueError):
        open_disk(str(tmp_path), fmt="vmdk")  # type: ignore[arg-type]


def test_open_disk_probes(tmp_path: Path) -> None:
    raw = make_image(tmp_path / "a.raw")
    assert probe_format(raw) == "raw"
    disk = open_disk(raw)
    try:
        assert getattr(disk, "format_name", None) == "raw"
    finally:
        disk.close()
    qcow = make_image(tmp_path / "b.img", data=b"QFI\xfb" + bytes(100))
    assert probe_format(qcow) == "qcow2"
    # Forced raw serves the bytes as they are, header included.
    disk = open_disk(qcow, fmt="raw")
    try:
        assert getattr(disk, "format_name", None) == "raw"
        assert disk.size == DISK_SIZE
    finally:
        disk.close()


def qcow_available() -> bool:
    try:
        from blkdev.disks.qcow import QcowDisk  # noqa: F401
    except ImportError:
        return False
    return True


def test_open_disk_qcow2_probe_never_follows_a_backing_file(tmp_path: Path) -> None:
    base = make_image(tmp_path / "base.raw")
    overlay = str(tmp_path / "overlay.qcow2")
    plain = str(tmp_path / "plain.qcow2")
    for args in (["-b", base, "-F", "raw", overlay], [plain, "1M"]):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *args], check=True)
    if not qcow_available():
        for path in (plain, overlay):
            with pytest.raises(ImageError, match="qcow2 support is not available"):
                open_disk(path)
        return
    disk = open_disk(plain)
    try:
        assert getattr(disk, "format_name", None) == "qcow2"
        assert disk.size == 1 << 20
    finally:
        disk.close()
    with pytest.raises(ImageError):
        open_disk(overlay)  # probed: the backing file is not opened
    disk = open_disk(overlay, fmt="qcow2")
    disk.close()


@pytest.mark.parametrize("cache", ["writeback", "none"])
def test_probed_raw_refuses_a_guest_write_that_would_make_it_qcow2(
    tmp_path: Path, memory: GuestMemory, cache: str
) -> None:
    """A guest that writes a qcow2 header into a raw disk served with ``--format auto`` would,
    at the next start, choose the image's virtual size (and grow the host file as it likes):
    refused, as QEMU refuses it for probed raw images. Everything else at offset 0 (an MBR, a
    file system) is written as usual, and ``fmt="raw"`` lets the header through."""
    qcow = tmp_path / "donor.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow), "1T"], check=True)
    header = qcow.read_bytes()[:4096]
    path = make_image(tmp_path / "disk.raw", data=b"\x5a" * DISK_SIZE)
    memory.write_at(0x10000, header)
    disk = open_disk(path, cache=cache)  # type: ignore[arg-type]
    try:
        assert getattr(disk, "format_name", None) == "raw"
        with pytest.raises(DiskIOError, match="--format raw") as info:
            disk.write(0, request_buffers_from_buffers(memory, [(0x10000, 4096)], False))
        assert info.value.errno == errno.EPERM
        # Split across descriptors (the check is on the copy, not on guest memory).
        pieces = [(0x10000, 3), (0x10003, 509), (0x10200, 3584)]
        with pytest.raises(DiskIOError):
            disk.write(0, request_buffers_from_buffers(memory, pieces, False))
        assert Path(path).read_bytes() == b"\x5a" * DISK_SIZE
        mbr = b"\xeb\x63\x90" + bytes(507) + b"\x55\xaa"
        memory.write_at(0x30000, mbr + b"\x01" * 7680)
        disk.write(0, request_buffers_from_buffers(memory, [(0x30000, 8192)], False))
        disk.write(4096, request_buffers_from_buffers(memory, [(0x10000, 4096)], False))
        disk.flush()
    finally:
        disk.close()
    data = Path(path).read_bytes()
    assert data[:512] == mbr and data[512:4096] == b"\x01" * 3584
    assert data[4096:8192] == header
    assert probe_format(path) == "raw"
    disk = open_disk(path, fmt="raw")
    try:
        disk.write(0, request_buffers_from_buffers(memory, [(0x10000, 4096)], False))
    finally:
        disk.close()
    assert probe_format(path) == "qcow2"
