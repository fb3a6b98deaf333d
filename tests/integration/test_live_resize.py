"""Growing a disk under a running Linux guest: through the control socket (a raw file, a qcow2
image) and by growing the host block device itself (a loop device: ``truncate`` + ``losetup -c``,
whose kernel uevent the backend follows). The guest must see the new capacity without a
reboot, write and read at its new end, and the image must hold what it wrote (qemu-img check
and compare for qcow2).

The guest prints ``RESIZE-NOW`` with the old size read; the host then resizes and the guest
waits (bounded) until ``/sys/block/vda/size`` changes.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from deploy.vm import REPO_ROOT
from tests.integration.helpers import (
    Harness,
    MiB,
    assert_backend_clean,
    assert_vm_ok,
    random_bytes,
)
from tests.support.loopdev import loop_device

pytestmark = pytest.mark.integration

OLD = 32 * MiB
NEW = 48 * MiB
TAIL = 256 * 1024  # written by the guest at the very end of the grown disk


def _script() -> str:
    return (
        "\n".join(
            [
                'info size0 "$(cat /sys/block/vda/size)"',
                "echo RESIZE-NOW",
                "i=0",
                f'while [ "$(cat /sys/block/vda/size)" = "{OLD // 512}" ] && [ $i -lt 240 ]; do',
                "  sleep 0.5; i=$((i+1))",
                "done",
                'info size1 "$(cat /sys/block/vda/size)"',
                'info getsize64 "$(blockdev --getsize64 /dev/vda)"',
                f"check write_tail dd if=/data/tail of=/dev/vda bs=4096 "
                f"seek={(NEW - TAIL) // 4096} oflag=direct conv=notrunc,fsync",
                "echo 3 > /proc/sys/vm/drop_caches",
                f'info tail "$(sha_range bs=4096 skip={(NEW - TAIL) // 4096} '
                f'count={TAIL // 4096})"',
                "check_dmesg_clean dmesg",
            ]
        )
        + "\n"
    )


def _on_marker(action: Callable[[], None], done: list[str]) -> Callable[[str], None]:
    """A console callback that runs ``action`` once, when the guest asks for the resize."""

    def on_line(line: str) -> None:
        if "RESIZE-NOW" in line and not line.lstrip().startswith("+") and not done:
            done.append(line)
            action()

    return on_line


def _ctl(control: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blkdev.cli", "ctl", str(control), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )


def _check_guest(result_info: dict[str, str], tail: bytes) -> None:
    assert result_info["size0"] == str(OLD // 512)
    assert result_info["size1"] == str(NEW // 512), "the guest never saw the new capacity"
    assert result_info["getsize64"] == str(NEW)
    assert result_info["tail"] == hashlib.sha256(tail).hexdigest()


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_resize_through_the_control_socket(harness: Harness, fmt: str) -> None:
    tail = random_bytes(13, TAIL)
    head = random_bytes(14, 1 * MiB)
    if fmt == "raw":
        image = harness.image("disk.img", OLD, {0: head})
    else:
        raw = harness.image("head.img", OLD, {0: head})
        image = harness.workdir / "disk.qcow2"
        subprocess.run(
            ["qemu-img", "convert", "-O", "qcow2", str(raw), str(image)],
            check=True,
            timeout=60,
        )
    control = harness.sockdir / "ctl.sock"
    backend = harness.serve(image, kind="ours", fmt=fmt, extra_args=["--control", str(control)])
    replies: list[subprocess.CompletedProcess[str]] = []
    done: list[str] = []
    result = harness.run(
        _script(),
        backend,
        files={"/data/tail": tail},
        on_console_line=_on_marker(lambda: replies.append(_ctl(control, "resize", "48M")), done),
    )
    assert done, "the guest never asked for the resize\n" + result.report(backend)
    assert replies[0].returncode == 0, replies[0].stderr
    assert_vm_ok(result, backend)
    _check_guest(result.info, tail)
    status = json.loads(_ctl(control, "query-status").stdout)
    assert status["size"] == NEW
    backend.stop()
    assert_backend_clean(backend)
    if fmt == "raw":
        data = image.read_bytes()
        assert len(data) == NEW
    else:
        check = subprocess.run(
            ["qemu-img", "check", str(image)], capture_output=True, text=True, timeout=60
        )
        assert check.returncode == 0, check.stdout + check.stderr
        out = harness.workdir / "out.raw"
        subprocess.run(
            ["qemu-img", "convert", "-O", "raw", str(image), str(out)], check=True, timeout=60
        )
        data = out.read_bytes()
        assert len(data) == NEW
    assert data[: len(head)] == head
    assert data[NEW - TAIL :] == tail
    assert data[len(head) : NEW - TAIL] == bytes(NEW - TAIL - len(head))


@pytest.fixture
def loop(harness: Harness) -> Iterator[tuple[Path, str]]:
    backing = harness.image("loop.img", OLD, {0: random_bytes(15, 4096)})
    with loop_device(backing) as dev:
        try:
            yield backing, dev
        finally:
            harness.close()  # the backend holds the device open until it stops


def test_a_grown_block_device_is_followed(harness: Harness, loop: tuple[Path, str]) -> None:
    backing, dev = loop
    tail = random_bytes(16, TAIL)
    backend = harness.serve(Path(dev), kind="ours", fmt="raw")

    def grow() -> None:
        with open(backing, "r+b") as f:
            f.truncate(NEW)
        subprocess.run(["losetup", "-c", dev], check=True, timeout=30)

    done: list[str] = []
    result = harness.run(
        _script(), backend, files={"/data/tail": tail}, on_console_line=_on_marker(grow, done)
    )
    assert done, "the guest never asked for the resize\n" + result.report(backend)
    assert_vm_ok(result, backend)
    _check_guest(result.info, tail)
    backend.stop()
    assert_backend_clean(backend)
    assert any(r.get("event") == "image size changed" for r in backend.log_records())
    data = backing.read_bytes()
    assert data[NEW - TAIL :] == tail
