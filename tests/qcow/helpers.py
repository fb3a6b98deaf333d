"""Shared helpers of the qcow tests: qemu-img as the oracle, guest-memory buffers."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from blkdev.disks.qcow import QcowDisk
from memory import GuestMemory, request_buffers_from_buffers

MiB = 1 << 20


def qemu_img(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    # errors="replace": qemu-img quotes names out of hostile images (bitmaps, backing files)
    # byte for byte, and those need not be UTF-8.
    proc = subprocess.run(
        ["qemu-img", *map(str, args)],
        capture_output=True,
        text=True,
        errors="replace",
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"qemu-img {' '.join(map(str, args))}: {proc.stderr}")
    return proc


def qemu_io(image: Path, *commands: str, fmt: str = "qcow2") -> None:
    args: list[str] = ["qemu-io", "-f", fmt]
    for c in commands:
        args += ["-c", c]
    proc = subprocess.run(
        [*args, str(image)], capture_output=True, text=True, errors="replace", check=False
    )
    assert proc.returncode == 0 and "error" not in proc.stdout.lower(), proc.stdout + proc.stderr


def qemu_check(image: Path) -> dict[str, Any]:
    """``qemu-img check`` as JSON (exit status 0, 2 or 3 all give a report)."""
    proc = qemu_img("check", "--output=json", image, check=False)
    assert proc.returncode in (0, 2, 3), proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def assert_clean(image: Path) -> None:
    report = qemu_check(image)
    assert report.get("corruptions", 0) == 0, report
    assert report.get("leaks", 0) == 0, report
    assert report.get("check-errors", 0) == 0, report


def as_raw(image: Path, out: Path) -> bytes:
    qemu_img("convert", "-O", "raw", image, out)
    return out.read_bytes()


def read_all(disk: QcowDisk) -> bytes:
    buf = bytearray(disk.size)
    disk.read_vecs(0, [memoryview(buf)])
    return bytes(buf)


def guest_read(disk: QcowDisk, mem: GuestMemory, offset: int, length: int, gpa: int = 0) -> bytes:
    buffers = request_buffers_from_buffers(mem, [(gpa, length)], True)
    disk.read(offset, buffers)
    return mem.read_at(gpa, length)


def guest_write(disk: QcowDisk, mem: GuestMemory, offset: int, data: bytes, gpa: int = 0) -> None:
    mem.write_at(gpa, data)
    disk.write(offset, request_buffers_from_buffers(mem, [(gpa, len(data))], False))
