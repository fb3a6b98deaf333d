"""Image locking: our opens against each other (in one and in two processes) and against QEMU."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from blkdev.disks.raw import RawDisk
from blkdev.errors import ImageLockedError

pytestmark = pytest.mark.qemu


@pytest.fixture
def image(tmp_path: Path) -> str:
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(1 << 20))
    return str(path)


@pytest.mark.parametrize(
    ("first_ro", "second_ro", "conflict"),
    [(False, False, True), (False, True, True), (True, False, True), (True, True, False)],
)
def test_two_opens_in_one_process(
    image: str, first_ro: bool, second_ro: bool, conflict: bool
) -> None:
    # OFD locks belong to the open file description: two opens conflict even in one process.
    first = RawDisk.open(image, read_only=first_ro)
    try:
        if conflict:
            with pytest.raises(ImageLockedError):
                RawDisk.open(image, read_only=second_ro)
        else:
            RawDisk.open(image, read_only=second_ro).close()
    finally:
        first.close()
    RawDisk.open(image).close()  # released on close


@contextmanager
def held_by_child(image: str, read_only: bool) -> Iterator[subprocess.Popen[str]]:
    code = textwrap.dedent(
        f"""
        import sys
        from blkdev.disks.raw import RawDisk
        disk = RawDisk.open({image!r}, read_only={read_only})
        print("locked", flush=True)
        sys.stdin.read()
        disk.close()
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "locked\n"
        yield child
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=30)


def test_conflict_across_processes_names_the_holder(image: str) -> None:
    with held_by_child(image, read_only=False) as child:
        with pytest.raises(ImageLockedError, match=rf"pid {child.pid} \(python"):
            RawDisk.open(image, read_only=True)
    RawDisk.open(image).close()


def test_shared_read_only_across_processes(image: str) -> None:
    with held_by_child(image, read_only=True):
        RawDisk.open(image, read_only=True).close()
        with pytest.raises(ImageLockedError):
            RawDisk.open(image)


def qemu(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


def test_qemu_treats_a_writable_export_like_a_running_vm(image: str) -> None:
    write = ("qemu-io", "-f", "raw", "-c", "write 0 512")
    disk = RawDisk.open(image)
    try:
        result = qemu(*write, image)
        assert 'Failed to get "write" lock' in result.stderr + result.stdout
        assert "wrote" not in result.stdout
        # As with a VM's raw image: readers may look, and -U overrides at the user's risk.
        assert (
            "read 512/512" in qemu("qemu-io", "-r", "-f", "raw", "-c", "read 0 512", image).stdout
        )
    finally:
        disk.close()
    assert "wrote 512/512" in qemu(*write, image).stdout


def test_read_only_export_admits_qemu_readers_not_writers(image: str) -> None:
    disk = RawDisk.open(image, read_only=True)
    try:
        assert qemu("qemu-img", "info", "-f", "raw", image).returncode == 0
        read = qemu("qemu-io", "-r", "-f", "raw", "-c", "read 0 512", image)
        assert "read 512/512" in read.stdout
        write = qemu("qemu-io", "-f", "raw", "-c", "write 0 512", image)
        assert "lock" in write.stderr + write.stdout
        assert "wrote" not in write.stdout
    finally:
        disk.close()


def test_running_qemu_writer_blocks_a_read_only_export(image: str) -> None:
    # qemu-io holds its locks while it waits for commands on stdin.
    writer = subprocess.Popen(
        ["qemu-io", "-f", "raw", image],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert writer.stdin is not None and writer.stdout is not None
        writer.stdin.write("read 0 512\n")
        writer.stdin.flush()
        while "read 512/512" not in writer.stdout.readline():
            pass
        with pytest.raises(ImageLockedError, match="being written by"):
            RawDisk.open(image, read_only=True)
        with pytest.raises(ImageLockedError):
            RawDisk.open(image)
    finally:
        writer.communicate("quit\n", timeout=30)
