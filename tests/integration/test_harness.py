"""The harness itself: cpio archives the kernel and cpio(1) accept, marker parsing, and that
guest failures, hangs and dead backends are reported, not missed."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from deploy.guest import CpioWriter, Guest, script_cpio
from deploy.vm import VmResult, parse_markers, run_vm
from tests.integration.helpers import Harness, MiB

pytestmark = pytest.mark.integration


def _extract(archive: bytes, dest: Path) -> None:
    dest.mkdir()
    proc = subprocess.run(
        ["cpio", "-idm", "--no-absolute-filenames", "--quiet"],
        input=archive,
        cwd=dest,
        capture_output=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def test_cpio_round_trips_through_cpio_tool(tmp_path: Path) -> None:
    w = CpioWriter()
    w.directory("etc")
    w.file("etc/odd", b"x" * 5, 0o640)
    w.file("empty", b"")
    w.symlink("link", "etc/odd")
    _extract(w.getvalue(), tmp_path / "a")
    assert (tmp_path / "a/etc/odd").read_bytes() == b"xxxxx"
    assert (tmp_path / "a/etc/odd").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "a/empty").read_bytes() == b""
    assert (tmp_path / "a/link").readlink() == Path("etc/odd")


def test_script_cpio_holds_script_and_files(tmp_path: Path) -> None:
    _extract(script_cpio("echo hi\n", {"/data/deep/f": b"abc"}), tmp_path / "s")
    assert (tmp_path / "s/test.sh").read_text() == "echo hi\n"
    assert (tmp_path / "s/test.sh").stat().st_mode & 0o111
    assert (tmp_path / "s/data/deep/f").read_bytes() == b"abc"


def _result(tmp_path: Path) -> VmResult:
    return VmResult(None, False, False, 0.0, tmp_path / "c", tmp_path / "q")


def test_parse_markers(tmp_path: Path) -> None:
    r = _result(tmp_path)
    parse_markers(
        "\r\n".join(
            [
                "noise @@BOOTED 6.1 cpus=1",
                "@@RESULT a PASS",
                "@@RESULT b FAIL rc=1: it broke",
                "@@RESULT c MAYBE",
                "@@INFO sha abc def",
                "@@DONE 0",
            ]
        ),
        r,
    )
    assert r.booted and r.done_rc == 0
    assert [(c.name, c.passed, c.detail) for c in r.checks] == [
        ("a", True, ""),
        ("b", False, "rc=1: it broke"),
    ]
    assert r.info == {"sha": "abc def"}
    assert not r.ok  # b failed


def test_guest_failure_is_reported(harness: Harness) -> None:
    backend = harness.serve(harness.image("d.img", 16 * MiB), kind="qsd")
    script = "check good true\ncheck bad false\ncheck_fails also_bad true\n"
    r = harness.run(script, backend)
    assert r.booted and r.done_rc == 0 and r.qemu_returncode == 0, r.report(backend)
    assert [c.name for c in r.failures()] == ["bad", "also_bad"]
    assert r.check("good").passed
    assert not r.ok
    assert "FAIL bad" in r.report(backend)


def test_hung_guest_is_killed(harness: Harness, guest: Guest) -> None:
    backend = harness.serve(harness.image("d.img", 16 * MiB), kind="qsd")
    start = time.monotonic()
    r = run_vm(
        guest,
        "result started PASS\nsleep 600\n",
        socket=backend.socket,
        workdir=harness.workdir,
        backend=backend,
        timeout=40,
    )
    assert r.timed_out and not r.ok
    assert time.monotonic() - start < 75
    assert r.booted, r.report(backend)


def test_dead_backend_is_noticed(harness: Harness, guest: Guest) -> None:
    backend = harness.serve(harness.image("d.img", 16 * MiB), kind="qsd")
    script = "result started PASS\nsleep 600\n"
    lines: list[str] = []

    def on_line(line: str) -> None:
        lines.append(line)
        if "@@RESULT started" in line:
            backend.proc.kill()

    r = run_vm(
        guest,
        script,
        socket=backend.socket,
        workdir=harness.workdir,
        backend=backend,
        timeout=120,
        on_console_line=on_line,
    )
    assert not r.ok
    assert r.backend_died or r.qemu_returncode != 0, r.report(backend)
    assert r.duration < 60, r.report(backend)
