"""A qcow2 overlay over a compressed qcow2 base, served with ``--format qcow2``."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from deploy.vm import BackendKind
from tests.integration.helpers import (
    DEFAULT_BACKEND,
    Harness,
    MiB,
    assert_backend_clean,
    assert_vm_ok,
    random_bytes,
)

pytestmark = pytest.mark.integration

DISK = 64 * MiB


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _qemu_img(*args: str) -> str:
    proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"qemu-img {' '.join(args)}: {proc.stderr}"
    return proc.stdout


@pytest.mark.parametrize("kind", sorted({DEFAULT_BACKEND, "qsd"}))
def test_qcow2_overlay_over_compressed_base(harness: Harness, kind: BackendKind) -> None:
    """Differential: qemu-storage-daemon passing proves the test; our server must too."""
    # Base: compressible data at 0..8M (so clusters really are stored compressed) and random
    # data at 8..10M; converted with -c.
    text = b"".join(b"block %08d of the compressed base image\n" % i for i in range(200_000))
    base_data = {0: text[: 8 * MiB], 8 * MiB: random_bytes(31, 2 * MiB)}
    raw = harness.image("base.raw", DISK, base_data)
    base = harness.workdir / "base.qcow2"
    overlay = harness.workdir / "overlay.qcow2"
    _qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(base))
    _qemu_img("create", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(overlay))
    assert base.stat().st_size < 4 * MiB, "base clusters were not stored compressed"
    base_sha = _sha(base.read_bytes())
    backend = harness.serve(overlay, kind=kind, fmt="qcow2")
    fio = (
        "fio --name=v --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=8 "
        "--rw=randwrite --bsrange=4k-64k --size=16M --offset=16M --verify=crc32c "
        "--verify_fatal=1"
    )
    script = f"""
info size $(blockdev --getsize64 /dev/vda)
info base0 $(sha_range bs=1M count=8)
info base8 $(sha_range bs=1M skip=8 count=2)
check partial_overwrite dd if=/data/x of=/dev/vda bs=512 seek=3 oflag=direct conv=notrunc
check fio {fio}
check mkfs mkfs.ext4 -q -F -E offset={40 * MiB} /dev/vda 24M
check_dmesg_clean dmesg
"""
    patch = random_bytes(32, 4096)
    result = harness.run(script, backend, files={"/data/x": patch})
    assert_vm_ok(result, backend)
    assert result.info["size"] == str(DISK)
    assert result.info["base0"] == _sha(text[: 8 * MiB]), "compressed base read back wrong"
    assert result.info["base8"] == _sha(base_data[8 * MiB])
    backend.stop()
    assert _sha(base.read_bytes()) == base_sha, "the backing file was modified"
    check = json.loads(_qemu_img("check", "--output=json", str(overlay)))
    assert check.get("corruptions", 0) == 0 and check.get("leaks", 0) == 0, check
    flat = harness.workdir / "flat.raw"
    _qemu_img("convert", "-f", "qcow2", "-O", "raw", str(overlay), str(flat))
    data = flat.read_bytes()
    # The sub-cluster write merged with the compressed cluster under it (copy-on-write).
    expected_head = bytearray(text[:8192])
    expected_head[3 * 512 : 3 * 512 + 4096] = patch
    assert data[:8192] == bytes(expected_head)
    assert data[1 * MiB : 8 * MiB] == text[1 * MiB : 8 * MiB]
    fs = Path(harness.workdir / "fs.raw")
    fs.write_bytes(data[40 * MiB : 64 * MiB])
    fsck = subprocess.run(["e2fsck", "-fn", str(fs)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert_backend_clean(backend)
