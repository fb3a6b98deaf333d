"""libvirt for real: the shipped domain XML validates (virt-xml-validate), and a real libvirtd
with its QEMU driver boots it (``virsh create``) against our backend, QEMU running as
libvirt's unprivileged user; the guest reads what the image holds and writes to it.

The daemon is the system one (``qemu:///system``); if none runs, the test starts
``virtlogd`` and ``libvirtd`` (deploy/setup.sh installs them and creates the ``libvirt-qemu``
user in group ``kvm``, as Debian's libvirt-daemon-system does) and stops them at the end.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.vm import REPO_ROOT, VmResult, parse_markers, short_tmpdir
from tests.integration.helpers import Harness, MiB, assert_backend_clean, random_bytes

DOMAIN_XML = REPO_ROOT / "deploy" / "libvirt" / "vhost-user-blk-domain.xml"
VIRSH = ["virsh", "-c", "qemu:///system"]
BOOT_TIMEOUT = 180.0


def _virsh(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VIRSH, *args], capture_output=True, text=True, timeout=timeout)


def test_domain_xml_validates() -> None:
    proc = subprocess.run(
        ["virt-xml-validate", str(DOMAIN_XML), "domain"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _pidfile_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


@pytest.fixture(scope="module")
def libvirtd() -> Iterator[None]:
    if _virsh("version").returncode == 0:
        yield
        return
    Path("/var/log/libvirt").mkdir(parents=True, exist_ok=True)
    Path("/run/libvirt").mkdir(parents=True, exist_ok=True)
    started: list[Path] = []
    for daemon, pidfile in (
        ("virtlogd", Path("/run/vub-test-virtlogd.pid")),
        ("libvirtd", Path("/run/vub-test-libvirtd.pid")),
    ):
        subprocess.run([daemon, "-d", "-p", str(pidfile)], check=True, timeout=60)
        started.append(pidfile)
    deadline = time.monotonic() + 30
    while _virsh("version").returncode != 0:
        if time.monotonic() > deadline:
            log = Path("/var/log/libvirt/libvirtd.log")
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            pytest.fail(f"libvirtd did not come up in 30 s\n{tail}")
        time.sleep(0.5)
    try:
        yield
    finally:
        for pidfile in reversed(started):
            pid = _pidfile_pid(pidfile)
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass


def _domain_xml(name: str, kernel: Path, initrd: Path, sock: Path, logs: Path) -> str:
    text = DOMAIN_XML.read_text()
    for old, new in (
        ("<name>vhost-user-blk-demo</name>", f"<name>{name}</name>"),
        ("/var/lib/vhost-user-blk/guest/vmlinuz", str(kernel)),
        ("/var/lib/vhost-user-blk/guest/initrd.cpio", str(initrd)),
        ("/run/vhost-user-blk/disk0.sock", str(sock)),
        ("/var/log/vhost-user-blk/demo-console.log", str(logs / "console.log")),
        ("/var/log/vhost-user-blk/demo-markers.log", str(logs / "markers.log")),
    ):
        assert old in text, f"{old} is no longer in {DOMAIN_XML.name}: update this test"
        text = text.replace(old, new)
    return text


@pytest.mark.integration
def test_virsh_create_boots_a_guest_on_our_backend(harness: Harness, libvirtd: None) -> None:
    data = random_bytes(31, 1 * MiB)
    written = random_bytes(32, 65536)
    image = harness.image("disk.img", 16 * MiB, {0: data})
    script = (
        f'info head "$(sha_range bs=4096 count={len(data) // 4096})"\n'
        "check write dd if=/data/w of=/dev/vda bs=4096 count=16 seek=1024 oflag=direct\n"
        "check_dmesg_clean dmesg\n"
    )
    name = f"vub-test-{os.getpid()}"
    # Everything QEMU opens must be reachable by libvirt-qemu: a world-traversable folder.
    with short_tmpdir("vub-lv-") as d:
        d.chmod(0o755)
        kernel = d / "vmlinuz"
        shutil.copyfile(harness.guest.kernel, kernel)
        initrd = harness.guest.with_script(script, d / "initrd.cpio", {"/data/w": written})
        for f in (kernel, initrd):
            f.chmod(0o644)
        sock = d / "disk0.sock"
        backend = harness.serve(
            image,
            kind="ours",
            extra_args=["--socket-group", "kvm", "--socket-mode", "0660"],
        )
        # harness.serve chose its own socket path; libvirt gets a link to it in our folder.
        sock.symlink_to(backend.socket)
        os.chmod(backend.socket.parent, 0o755)
        xml = d / "domain.xml"
        xml.write_text(_domain_xml(name, kernel, initrd, sock, d))
        created = _virsh("create", str(xml))
        try:
            assert created.returncode == 0, created.stdout + created.stderr
            deadline = time.monotonic() + BOOT_TIMEOUT
            # on_poweroff=destroy: the transient domain disappears when the guest is done.
            while _virsh("domstate", name).returncode == 0:
                assert time.monotonic() < deadline, "the guest did not finish in time"
                assert backend.alive(), backend.log_tail()
                time.sleep(1)
        finally:
            _virsh("destroy", name)
        result = VmResult(
            qemu_returncode=0,
            timed_out=False,
            backend_died=False,
            duration=0.0,
            console_path=d / "console.log",
            qemu_log_path=Path(f"/var/log/libvirt/qemu/{name}.log"),
        )
        parse_markers((d / "markers.log").read_text(errors="replace"), result)
        assert result.ok, result.report(backend)
        assert result.info["head"] == hashlib.sha256(data).hexdigest()
    backend.stop()
    assert_backend_clean(backend)
    assert image.read_bytes()[4 * MiB : 4 * MiB + len(written)] == written
