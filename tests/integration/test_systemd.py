"""systemd for real: the shipped units pass ``systemd-analyze verify``, and ``serve`` started by
``systemd-socket-activate`` (the socket bound before the backend runs, passed as LISTEN_FDS)
serves a booting guest and reports READY=1 and STOPPING=1 on NOTIFY_SOCKET."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.vm import REPO_ROOT
from tests.integration.helpers import Harness, MiB, assert_backend_clean, assert_vm_ok, random_bytes

UNITS = REPO_ROOT / "deploy" / "systemd"


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """Verified as an instance (disk0), with ExecStart pointing at the installed command (the
    verifier insists the binary exists) and no warning on stderr (an unknown key is only a
    warning, with exit status 0)."""
    script = shutil.which("vhost-user-blk") or str(
        Path(os.environ.get("VIRTUAL_ENV", REPO_ROOT / ".venv")) / "bin" / "vhost-user-blk"
    )
    assert Path(script).exists(), "install the project (deploy/setup.sh) first"
    for unit in UNITS.iterdir():
        text = unit.read_text().replace("/usr/local/bin/vhost-user-blk", script)
        (tmp_path / unit.name).write_text(text)
    proc = subprocess.run(
        [
            "systemd-analyze",
            "verify",
            "--man=no",
            "vhost-user-blk@disk0.socket",
            "vhost-user-blk@disk0.service",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # EnvironmentFile= names a file of the host it runs on; anything else is a finding.
    findings = [ln for ln in proc.stderr.splitlines() if "/etc/vhost-user-blk/" not in ln]
    assert not findings, proc.stderr


@pytest.fixture
def notify_socket(harness: Harness) -> Iterator[tuple[socket.socket, Path]]:
    path = harness.sockdir / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    try:
        yield sock, path
    finally:
        sock.close()


def _messages(sock: socket.socket, want: str, timeout: float) -> list[str]:
    """Datagrams received until one contains ``want`` (or ``timeout`` s passed)."""
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not any(want in m for m in got):
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            pass
    return got


@pytest.mark.integration
def test_socket_activation_serves_a_guest_and_notifies(
    harness: Harness, notify_socket: tuple[socket.socket, Path]
) -> None:
    notify, notify_path = notify_socket
    data = random_bytes(21, 1 * MiB)
    image = harness.image("disk.img", 16 * MiB, {0: data})

    def launcher(sock: Path) -> list[str]:
        # systemd-socket-activate passes only the variables named with -E.
        env = {
            "PYTHONPATH": str(REPO_ROOT),
            "PYTHONUNBUFFERED": "1",
            "NOTIFY_SOCKET": str(notify_path),
            "PATH": os.environ["PATH"],
        }
        return ["systemd-socket-activate", "-l", str(sock), *(f"-E{k}={v}" for k, v in env.items())]

    backend = harness.serve(image, kind="ours", launcher=launcher, socket_option=False)
    # Nothing runs until QEMU connects: systemd-socket-activate waits for the first connection.
    script = (
        f'info head "$(sha_range bs=4096 count={len(data) // 4096})"\n'
        "check write dd if=/dev/zero of=/dev/vda bs=4096 count=16 seek=1024 oflag=direct\n"
        "check_dmesg_clean dmesg\n"
    )
    result = harness.run(script, backend)
    assert_vm_ok(result, backend)
    assert result.info["head"] == hashlib.sha256(data).hexdigest()
    ready = _messages(notify, "READY=1", timeout=10)
    assert any("READY=1" in m for m in ready), ready
    assert backend.stop() == 0
    stopping = _messages(notify, "STOPPING=1", timeout=5)
    assert any("STOPPING=1" in m for m in stopping), stopping
    assert_backend_clean(backend)
    records = backend.log_records()
    assert any(r.get("event") == "socket passed by systemd" for r in records), records[:5]
    # The socket belongs to whoever bound it: a stopped backend leaves its file alone.
    assert backend.socket.exists()
