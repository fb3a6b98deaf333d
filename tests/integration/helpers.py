"""Helpers for integration tests: a harness that starts backends and boots VMs sequentially
(and stops everything it started), and assertions whose messages carry the guest console and
backend log tails.

``VUB_BACKEND=qsd`` runs every test against qemu-storage-daemon (the reference backend)
instead of our server, to validate the tests themselves.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from deploy.guest import Guest
from deploy.vm import Backend, BackendKind, VmResult, run_vm, start_backend

DEFAULT_BACKEND: BackendKind = "qsd" if os.environ.get("VUB_BACKEND") == "qsd" else "ours"
MiB = 1 << 20

# Kernel messages that mean a request failed; none may appear unless a test expects them.
IO_ERROR_WORDS = ("I/O error", "blk_update_request", "Buffer I/O error", "EXT4-fs error")


class Harness:
    def __init__(self, guest: Guest, workdir: Path, sockdir: Path) -> None:
        self.guest = guest
        self.workdir = workdir
        self.sockdir = sockdir
        self._backends: list[Backend] = []
        self._n = 0

    def image(self, name: str, size: int, data: Mapping[int, bytes] | None = None) -> Path:
        """A sparse raw image of ``size`` bytes with ``data`` (offset -> bytes) written in."""
        path = self.workdir / name
        with open(path, "wb") as f:
            f.truncate(size)
            for off, chunk in (data or {}).items():
                f.seek(off)
                f.write(chunk)
        return path

    def serve(
        self,
        image: Path | str,
        kind: BackendKind | None = None,
        *,
        fmt: str = "auto",
        read_only: bool = False,
        num_queues: int = 1,
        serial: str | None = None,
        extra_args: Sequence[str] = (),
        launcher: Callable[[Path], Sequence[str]] | None = None,
        socket_option: bool = True,
    ) -> Backend:
        """Start a backend on a fresh socket; it is stopped at the end of the test. ``image``
        is a file or an ``rbd:`` spec (str). A ``launcher(socket)`` is the command line that
        runs ours (see ``start_backend``)."""
        self._n += 1
        kind = kind or DEFAULT_BACKEND
        sock = self.sockdir / f"b{self._n}.sock"
        backend = start_backend(
            kind,
            socket=sock,
            image=image,
            log_path=self.workdir / f"backend{self._n}-{kind}.log",
            fmt=fmt,
            read_only=read_only,
            num_queues=num_queues,
            serial=serial,
            log_level="debug" if os.environ.get("VUB_DEBUG") else "info",
            extra_args=extra_args,
            launcher=launcher(sock) if launcher is not None else (),
            socket_option=socket_option,
        )
        self._backends.append(backend)
        return backend

    def run(
        self,
        script: str,
        backend: Backend,
        *,
        name: str = "vm",
        files: Mapping[str, bytes] | None = None,
        smp: int = 1,
        num_queues: int = 1,
        on_console_line: Callable[[str], None] | None = None,
    ) -> VmResult:
        return run_vm(
            self.guest,
            script,
            socket=backend.socket,
            workdir=self.workdir,
            name=name,
            backend=backend,
            smp=smp,
            num_queues=num_queues,
            files=files,
            on_console_line=on_console_line,
        )

    def close(self) -> None:
        for b in self._backends:
            b.stop()


def assert_vm_ok(result: VmResult, backend: Backend, *, io_errors_expected: bool = False) -> None:
    """Every guest check passed, the script finished, and (unless expected) the kernel logged
    no I/O error; the message carries the console and backend log tails."""
    assert result.ok, result.report(backend)
    if not io_errors_expected:
        bad = [ln for ln in result.console.splitlines() if any(w in ln for w in IO_ERROR_WORDS)]
        assert not bad, f"I/O errors on the guest console: {bad[:5]}\n" + result.report(backend)


def assert_backend_clean(backend: Backend) -> None:
    """Our server logged nothing at error level or above (qemu-storage-daemon: no check)."""
    if backend.kind != "ours":
        return
    bad = [
        r
        for r in backend.log_records()
        if str(r.get("level", "")).lower() in ("error", "critical", "exception")
    ]
    assert not bad, f"backend logged errors: {bad[:5]}\n--- log ---\n{backend.log_tail()}"


def random_bytes(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)
