"""The real front-end: QEMU 7.2's vhost-user-blk-pci connects to the server, negotiates, hands
over guest memory (ADD_MEM_REG) and starts the ring; SeaBIOS then reads the boot sector through
our backend. No guest kernel needed, so it takes seconds under TCG."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from blkdev.device import BlkDevice
from blkdev.disks import open_disk
from vhost_user.server import Server

pytestmark = pytest.mark.qemu

QEMU = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"


class CountingBlk(BlkDevice):
    """BlkDevice that counts the requests it serves (either data plane: its statistics) and
    its quiesce calls."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.quiesced = 0

    @property
    def served(self) -> int:
        return sum(sum(q.snapshot().requests) for q in self.stats.queues)

    def release(self) -> None:
        pass

    def acquire(self) -> None:
        pass

    def quiesce(self) -> None:
        super().quiesce()
        self.quiesced += 1


def test_qemu_boots_firmware_from_our_backend(tmp_path: Path) -> None:
    image = tmp_path / "boot.raw"
    sector0 = bytearray(512)
    sector0[0:2] = b"\xeb\xfe"  # jmp $: spin forever once the BIOS jumps to it
    sector0[510:512] = b"\x55\xaa"
    image.write_bytes(bytes(sector0) + bytes(4 * 1024 * 1024 - 512))
    sock = str(tmp_path / "vhost.sock")
    disk = open_disk(str(image), fmt="raw")
    device = CountingBlk(disk, num_queues=1, queue_size=128)
    server = Server(sock, device)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    qemu = subprocess.Popen(
        [
            QEMU,
            "-machine", "q35", "-accel", "tcg", "-m", "128",
            "-object", "memory-backend-memfd,id=mem,size=128M,share=on",
            "-numa", "node,memdev=mem",
            "-chardev", f"socket,id=vu,path={sock}",
            "-device", "vhost-user-blk-pci,chardev=vu,num-queues=1,bootindex=1",
            "-display", "none", "-serial", "none", "-monitor", "none", "-nodefaults",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while device.served == 0 and qemu.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert qemu.poll() is None, qemu.stderr.read().decode() if qemu.stderr else ""
        assert device.served >= 1, "the firmware never read the disk through us"
        assert server.connection is not None
    finally:
        qemu.terminate()
        qemu.wait(10)
        if qemu.stderr is not None:
            qemu.stderr.close()
    # QEMU is gone: the server drops the connection, quiesces, and waits for the next one.
    deadline = time.monotonic() + 10
    while server.connection is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.connection is None
    assert device.quiesced >= 1
    server.stop()
    thread.join(10)
    assert not thread.is_alive()
    disk.close()
