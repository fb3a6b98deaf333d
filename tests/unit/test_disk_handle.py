"""blkdev.disks.handle: the image changes hands for live migration. Real images and real OFD
locks: a second opener (the other backend) gets the image only once the first let go."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from blkdev.disks import open_disk
from blkdev.disks.disk import Disk
from blkdev.disks.handle import DiskHandle
from blkdev.errors import ImageLockedError

MiB = 1 << 20


def _image(tmp_path: Path) -> str:
    path = tmp_path / "d.img"
    path.write_bytes(bytes(MiB))
    return str(path)


def test_release_drops_the_lock_and_acquire_takes_it_back(tmp_path: Path) -> None:
    image = _image(tmp_path)

    def opener() -> Disk:
        return open_disk(image, fmt="raw")

    source = DiskHandle(opener, opener())
    with pytest.raises(ImageLockedError):
        open_disk(image, fmt="raw")  # held: nobody else may write
    source.release()
    assert not source.held and source.size == MiB and source.format_name == "raw"
    source.flush()  # nothing to flush while released
    with pytest.raises(ValueError, match="handed over"):
        source.discard(0, 4096)
    other = open_disk(image, fmt="raw")  # the destination takes it
    with pytest.raises(ImageLockedError):
        source.acquire(timeout=0.2)
    other.close()
    source.acquire()
    assert source.held
    source.close()
    with pytest.raises(ValueError, match="closed"):
        source.acquire()


def test_an_incoming_handle_only_looks_then_waits_for_the_source(tmp_path: Path) -> None:
    image = _image(tmp_path)
    source = open_disk(image, fmt="raw")
    look = open_disk(image, fmt="raw", read_only=True, lock=False)  # no conflict with source
    incoming = DiskHandle(lambda: open_disk(image, fmt="raw"), look, held=False, read_only=False)
    assert not incoming.held
    assert not incoming.read_only and incoming.supports_discard and incoming.size == MiB
    let_go = threading.Timer(0.3, source.close)
    let_go.start()
    started = time.monotonic()
    incoming.acquire(timeout=10)  # retries until the source closes
    let_go.join(5)
    assert incoming.held and time.monotonic() - started >= 0.2
    incoming.close()


def test_an_unlocked_look_must_be_read_only(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="always locked"):
        open_disk(_image(tmp_path), fmt="raw", lock=False)
