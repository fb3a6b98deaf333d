"""blkdev.resize and blkdev.uevents: the disk, the capacity the guest is told and the notice to
the front-end stay in order; refusals change nothing; a real loop device grown with
``truncate`` + ``losetup -c`` fires the watcher through the kernel's uevent."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blkdev.device import BlkDevice
from blkdev.disks.qcow import QcowDisk
from blkdev.disks.raw import RawDisk
from blkdev.errors import ResizeRefused
from blkdev.resize import LiveResize
from blkdev.uevents import ResizeWatcher, is_resize_of
from tests.support.loopdev import loop_device

MiB = 1 << 20


def _capacity(device: BlkDevice) -> int:
    return int.from_bytes(device.read_config(0, 8), "little")


@pytest.fixture
def raw(tmp_path: Path) -> Iterator[RawDisk]:
    path = tmp_path / "d.img"
    path.write_bytes(b"\xab" * MiB)
    disk = RawDisk.open(str(path), read_only=False)
    try:
        yield disk
    finally:
        disk.close()


def test_grow_then_notify(raw: RawDisk, tmp_path: Path) -> None:
    device = BlkDevice(raw)
    seen: list[tuple[int, int]] = []

    def notify() -> bool:
        # The notice goes out after both the image and the capacity have grown.
        seen.append((os.path.getsize(tmp_path / "d.img"), _capacity(device)))
        return True

    live = LiveResize(raw, device, notify)
    live.resize(4 * MiB, False)
    assert seen == [(4 * MiB, 4 * MiB // 512)]
    assert raw.size == device.capacity == 4 * MiB
    live.resize(4 * MiB, False)  # no change: no notice
    assert len(seen) == 1


def test_shrink_needs_force_and_lowers_the_capacity_first(raw: RawDisk, tmp_path: Path) -> None:
    device = BlkDevice(raw)
    notices: list[int] = []
    live = LiveResize(raw, device, lambda: notices.append(_capacity(device)) is None)
    with pytest.raises(ResizeRefused, match="pass force"):
        live.resize(MiB // 2, False)
    assert device.capacity == raw.size == MiB and notices == []
    assert os.path.getsize(tmp_path / "d.img") == MiB
    live.resize(MiB // 2, True)
    assert device.capacity == raw.size == MiB // 2
    assert os.path.getsize(tmp_path / "d.img") == MiB // 2
    assert notices == [MiB // 2 // 512]


def test_a_refused_qcow2_shrink_restores_the_capacity(tmp_path: Path) -> None:
    img = tmp_path / "q.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(img), "2M"], check=True, timeout=30)
    disk = QcowDisk.open(str(img), read_only=False)
    try:
        device = BlkDevice(disk)
        live = LiveResize(disk, device, lambda: True)
        with pytest.raises(ResizeRefused):
            live.resize(MiB, True)
        assert device.capacity == disk.size == 2 * MiB
        live.resize(8 * MiB, False)
        assert device.capacity == disk.size == 8 * MiB
    finally:
        disk.close()


def test_follow_rereads_the_size(raw: RawDisk, tmp_path: Path) -> None:
    device = BlkDevice(raw)
    notices: list[int] = []
    live = LiveResize(raw, device, lambda: notices.append(raw.size) is None)
    live.follow()
    assert notices == []  # nothing changed
    os.truncate(tmp_path / "d.img", 3 * MiB)
    live.follow()
    assert notices == [3 * MiB] and device.capacity == 3 * MiB


# -- uevents ----------------------------------------------------------------------------------

_EVENT = {"ACTION": "change", "SUBSYSTEM": "block", "RESIZE": "1", "MAJOR": "7", "MINOR": "3"}


def test_is_resize_of_matches_only_its_device() -> None:
    assert is_resize_of(_EVENT, 7, 3)
    assert not is_resize_of(_EVENT, 7, 4)
    assert not is_resize_of({**_EVENT, "ACTION": "add"}, 7, 3)
    assert not is_resize_of({**_EVENT, "RESIZE": "0"}, 7, 3)
    assert not is_resize_of({**_EVENT, "SUBSYSTEM": "net"}, 7, 3)
    assert not is_resize_of({**_EVENT, "MAJOR": "seven"}, 7, 3)


@given(
    st.dictionaries(
        st.sampled_from([*_EVENT, "DEVNAME", "X"]), st.one_of(st.text(), st.none(), st.integers())
    )
)
def test_is_resize_of_never_raises(event: dict[str, object]) -> None:
    assert isinstance(is_resize_of(event, 7, 3), bool)


@pytest.fixture
def loop(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    backing = tmp_path / "loop.img"
    backing.write_bytes(bytes(MiB))
    with loop_device(backing) as dev:
        yield backing, dev


def test_a_grown_loop_device_fires_the_watcher(loop: tuple[Path, str]) -> None:
    backing, dev = loop
    fired = threading.Event()
    disk = RawDisk.open(dev, read_only=False)
    try:
        assert disk.rdev == os.stat(dev).st_rdev and disk.size == MiB
        device = BlkDevice(disk)
        live = LiveResize(disk, device, lambda: fired.set() or True)
        watcher = ResizeWatcher(os.stat(dev).st_rdev, live.follow, name=dev)
        watcher.start()
        try:
            os.truncate(backing, 2 * MiB)
            subprocess.run(["losetup", "-c", dev], check=True, timeout=30)
            assert fired.wait(10), "no resize uevent reached the watcher"
        finally:
            watcher.stop()
        assert disk.size == device.capacity == 2 * MiB
        with pytest.raises(ResizeRefused, match="block device"):
            disk.resize(4 * MiB)
    finally:
        disk.close()
