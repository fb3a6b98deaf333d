"""Launch a vhost-user-blk backend and a QEMU guest that uses it; collect what the guest reports.

Everything started here runs in its own process group and is killed (SIGKILL after a grace
period) when its context ends or a deadline passes, so a hung guest or backend never outlives
the caller.

Typical use::

    guest = deploy.guest.ensure_built()
    with start_backend("ours", socket=sock, image=img, log_path=log) as backend:
        result = run_vm(guest, script, socket=sock, workdir=tmp, backend=backend)
    assert result.ok, result.report(backend)
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal

from deploy.guest import Guest

BackendKind = Literal["ours", "qsd"]
REPO_ROOT = Path(__file__).resolve().parent.parent

#: Default hard limit for one VM run; TCG on a busy 2-core host is slow.
DEFAULT_VM_TIMEOUT = float(os.environ.get("VUB_VM_TIMEOUT", "300"))


class BackendError(RuntimeError):
    """The backend did not start (exited early or never created its socket)."""


# --- process helpers -------------------------------------------------------------------------


def _spawn(
    argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,  # own process group: killpg reaches any children too
            preexec_fn=_die_with_parent,
        )


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL when the spawning thread dies, so that even a
    SIGKILLed test run leaves no QEMU or backend behind (prctl(2) PR_SET_PDEATHSIG)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _kill_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def terminate(proc: subprocess.Popen[bytes], grace: float = 10.0) -> int | None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL. Returns the exit code, or None
    if the process had to be killed."""
    if proc.poll() is not None:
        _kill_group(proc, signal.SIGKILL)  # stray children, if any
        return proc.returncode
    _kill_group(proc, signal.SIGTERM)
    try:
        rc = proc.wait(grace)
    except subprocess.TimeoutExpired:
        _kill_group(proc, signal.SIGKILL)
        proc.wait()
        return None
    _kill_group(proc, signal.SIGKILL)
    return rc


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"<{path} missing>"
    return "\n".join(text.splitlines()[-lines:])


# --- backends --------------------------------------------------------------------------------


def ours_command(
    *,
    socket: Path | None,
    image: Path | str,
    fmt: str = "auto",
    read_only: bool = False,
    num_queues: int = 1,
    serial: str | None = None,
    log_level: str = "info",
    log_format: str = "json",
    extra_args: Sequence[str] = (),
) -> list[str]:
    """``vhost-user-blk serve ...``: the installed console script if there is one beside this
    interpreter, otherwise ``python -m blkdev.cli``. No ``--socket`` when ``socket`` is None
    (socket activation)."""
    script = Path(sys.executable).parent / "vhost-user-blk"
    base = [str(script)] if script.exists() else [sys.executable, "-m", "blkdev.cli"]
    argv = [
        *base,
        "serve",
        *(["--socket", str(socket)] if socket is not None else []),
        "--image",
        str(image),
        "--format",
        fmt,
        "--num-queues",
        str(num_queues),
        "--log-format",
        log_format,
        "--log-level",
        log_level,
    ]
    if read_only:
        argv.append("--read-only")
    if serial is not None:
        argv += ["--serial", serial]
    return [*argv, *extra_args]


def qsd_command(
    *,
    socket: Path,
    image: Path | str,
    fmt: str = "raw",
    read_only: bool = False,
    num_queues: int = 1,
    serial: str | None = None,
    log_level: str = "info",
    log_format: str = "json",
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The reference backend: ``qemu-storage-daemon`` exporting ``image`` over vhost-user-blk.
    (``serial``, ``log_*`` have no equivalent and are ignored.)"""
    del serial, log_level, log_format
    ro = "on" if read_only else "off"
    if isinstance(image, str):
        return _qsd_rbd_command(socket, image, read_only, num_queues)
    blockdev = [f"driver=file,node-name=file0,filename={image},read-only={ro},discard=unmap"]
    node = "file0"
    if fmt == "qcow2":
        blockdev.append(f"driver=qcow2,node-name=fmt0,file=file0,read-only={ro},discard=unmap")
        node = "fmt0"
    argv = ["qemu-storage-daemon"]
    for b in blockdev:
        argv += ["--blockdev", b]
    argv += [
        "--export",
        f"type=vhost-user-blk,id=exp0,node-name={node},addr.type=unix,addr.path={socket},"
        f"writable={'off' if read_only else 'on'},num-queues={num_queues}",
    ]
    return argv


def _qsd_rbd_command(socket: Path, spec: str, read_only: bool, num_queues: int) -> list[str]:
    """qemu-storage-daemon's rbd driver (qemu-block-extra) on the image an ``rbd:`` spec names:
    pool, image, snapshot, conf and user carry over; other librados options do not (the rbd
    driver takes them only from the conf file)."""
    from blkdev.disks.rbd import parse_spec  # deploy's only use of the package: one parser

    rbd = parse_spec(spec.removeprefix("rbd:"))
    parts = [
        "driver=rbd,node-name=rbd0",
        f"pool={rbd.pool}",
        f"image={rbd.image}",
        *([f"snapshot={rbd.snap}"] if rbd.snap else []),
        *([f"conf={rbd.conf}"] if rbd.conf else []),
        *([f"user={rbd.user}"] if rbd.user else []),
        f"read-only={'on' if read_only or rbd.snap else 'off'}",
        "discard=unmap",
        "cache.direct=on",
    ]
    return [
        "qemu-storage-daemon",
        "--blockdev",
        ",".join(parts),
        "--export",
        f"type=vhost-user-blk,id=exp0,node-name=rbd0,addr.type=unix,addr.path={socket},"
        f"writable={'off' if read_only or rbd.snap else 'on'},num-queues={num_queues}",
    ]


@dataclasses.dataclass
class Backend:
    """A running backend process serving ``socket``."""

    kind: BackendKind
    socket: Path
    log_path: Path
    argv: list[str]
    proc: subprocess.Popen[bytes]
    exit_code: int | None = None
    stopped: bool = False

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.log_path, lines)

    def log_records(self) -> list[dict[str, object]]:
        """The JSON log lines (our server logs one JSON object per line)."""
        records: list[dict[str, object]] = []
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return records
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    obj = json.loads(line)
                    if isinstance(obj, dict):
                        records.append(obj)
        return records

    def stop(self, grace: float = 10.0) -> int | None:
        """Ask the backend to exit (SIGTERM), kill it after ``grace`` s. Idempotent."""
        if not self.stopped:
            self.exit_code = terminate(self.proc, grace)
            self.stopped = True
        return self.exit_code

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_backend(
    kind: BackendKind,
    *,
    socket: Path,
    image: Path | str,
    log_path: Path,
    fmt: str = "auto",
    read_only: bool = False,
    num_queues: int = 1,
    serial: str | None = None,
    log_level: str = "info",
    startup_timeout: float = 30.0,
    extra_args: Sequence[str] = (),
    launcher: Sequence[str] = (),
    socket_option: bool = True,
) -> Backend:
    """Start a backend and wait until its listening socket exists. ``extra_args`` go to
    ours only (``serve`` options such as ``--control``); ``launcher`` is a command line that
    runs ours (``systemd-socket-activate -l SOCKET ...``), which then gets ``--socket`` only
    if ``socket_option``."""
    if kind == "ours":
        argv = ours_command(
            socket=socket if socket_option else None,
            image=image,
            fmt=fmt,
            read_only=read_only,
            num_queues=num_queues,
            serial=serial,
            log_level=log_level,
            extra_args=extra_args,
        )
        argv = [*launcher, *argv]
    else:
        qfmt = fmt
        if fmt == "auto" and isinstance(image, Path):
            qfmt = "qcow2" if image.read_bytes()[:4] == b"QFI\xfb" else "raw"
        argv = qsd_command(
            socket=socket, image=image, fmt=qfmt, read_only=read_only, num_queues=num_queues
        )
    with contextlib.suppress(FileNotFoundError):
        socket.unlink()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    proc = _spawn(argv, log_path, env=env, cwd=REPO_ROOT)
    backend = Backend(kind, socket, log_path, argv, proc)
    deadline = time.monotonic() + startup_timeout
    while True:
        if proc.poll() is not None:
            backend.stop()
            raise BackendError(
                f"{kind} backend exited with {proc.returncode} before listening\n"
                f"argv: {' '.join(argv)}\n--- log ---\n{backend.log_tail()}"
            )
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(socket.stat().st_mode):
                return backend
        if time.monotonic() > deadline:
            backend.stop()
            raise BackendError(
                f"{kind} backend did not create {socket} within {startup_timeout:.0f}s\n"
                f"argv: {' '.join(argv)}\n--- log ---\n{backend.log_tail()}"
            )
        time.sleep(0.05)


# --- the VM ----------------------------------------------------------------------------------

_MARKER = re.compile(r"@@(?P<kind>RESULT|INFO|BOOTED|DONE|INIT)(?:\s+(?P<rest>.*))?$")


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


@dataclasses.dataclass
class VmResult:
    """What one guest run produced."""

    qemu_returncode: int | None
    timed_out: bool
    backend_died: bool
    duration: float
    console_path: Path
    qemu_log_path: Path
    booted: bool = False
    done_rc: int | None = None  # exit status of /test.sh, None if the script never finished
    checks: list[Check] = dataclasses.field(default_factory=list)
    info: dict[str, str] = dataclasses.field(default_factory=dict)
    init_errors: list[str] = dataclasses.field(default_factory=list)

    @property
    def console(self) -> str:
        try:
            return self.console_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def check(self, name: str) -> Check:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    @property
    def ok(self) -> bool:
        """Booted, ran the script to completion (exit 0), every check passed, QEMU exited 0."""
        return (
            self.booted
            and self.done_rc == 0
            and not self.timed_out
            and not self.backend_died
            and self.qemu_returncode == 0
            and bool(self.checks)
            and not self.failures()
            and not self.init_errors
        )

    def summary(self) -> str:
        state = (
            "TIMED OUT"
            if self.timed_out
            else "backend died"
            if self.backend_died
            else f"qemu rc={self.qemu_returncode}"
        )
        passed = sum(c.passed for c in self.checks)
        return (
            f"{state}, booted={self.booted}, script rc={self.done_rc}, "
            f"{passed}/{len(self.checks)} checks passed in {self.duration:.1f}s"
        )

    def report(self, backend: Backend | None = None, lines: int = 40) -> str:
        """A failure message: summary, failed checks, tails of console, QEMU and backend logs."""
        parts = [self.summary()]
        parts += [f"  FAIL {c.name}: {c.detail}" for c in self.failures()]
        parts += [f"  init: {e}" for e in self.init_errors]
        parts += [f"--- guest console (last {lines} lines) ---", tail(self.console_path, lines)]
        qlog = tail(self.qemu_log_path, 15).strip()
        if qlog:
            parts += ["--- qemu ---", qlog]
        if backend is not None:
            parts += [
                f"--- {backend.kind} backend log (last {lines} lines) ---",
                backend.log_tail(lines),
            ]
        return "\n".join(parts)


def parse_markers(text: str, result: VmResult) -> None:
    for raw in text.splitlines():
        line = raw.replace("\r", "").strip()
        m = _MARKER.search(line)
        if m is None:
            continue
        kind, rest = m.group("kind"), (m.group("rest") or "").strip()
        if kind == "BOOTED":
            result.booted = True
        elif kind == "DONE":
            with contextlib.suppress(ValueError):
                result.done_rc = int(rest.split()[0])
        elif kind == "INIT":
            result.init_errors.append(rest)
        elif kind == "INFO":
            key, _, value = rest.partition(" ")
            result.info[key] = value.strip()
        else:
            fields = rest.split(" ", 2)
            if len(fields) >= 2 and fields[1] in ("PASS", "FAIL"):
                detail = fields[2].strip() if len(fields) > 2 else ""
                result.checks.append(Check(fields[0], fields[1] == "PASS", detail))


def qemu_command(
    guest: Guest,
    initrd: Path,
    *,
    socket: Path,
    console_path: Path,
    markers_path: Path,
    smp: int = 1,
    memory_mib: int = 512,
    num_queues: int = 1,
    reconnect: bool = False,
    accel: str = "tcg",
    cmdline_extra: str = "",
    extra: Sequence[str] = (),
) -> list[str]:
    # vhost-user needs guest RAM in a shareable fd (memfd) so the backend can map it.
    chardev = f"socket,id=vub0,path={socket}" + (",reconnect=1" if reconnect else "")
    cmdline = (
        "console=ttyS0 rdinit=/init panic=-1 quiet loglevel=4 mitigations=off "
        "random.trust_cpu=on " + cmdline_extra
    ).strip()
    options = [
        ("-accel", accel),
        ("-display", "none"),
        ("-smp", str(smp)),
        ("-m", f"{memory_mib}M"),
        ("-object", f"memory-backend-memfd,id=mem,size={memory_mib}M,share=on"),
        ("-numa", "node,memdev=mem"),
        ("-kernel", str(guest.kernel)),
        ("-initrd", str(initrd)),
        ("-append", cmdline),
        ("-chardev", chardev),
        ("-device", f"vhost-user-blk-pci,chardev=vub0,num-queues={num_queues}"),
        ("-serial", f"file:{console_path}"),  # ttyS0: the console
        ("-serial", f"file:{markers_path}"),  # ttyS1: result markers only
    ]
    argv = ["qemu-system-x86_64", "-nodefaults", "-no-user-config", "-no-reboot"]
    for flag, value in options:
        argv += [flag, value]
    return [*argv, *extra]


class QmpError(RuntimeError):
    """QEMU answered a QMP command with an error, or the monitor went away."""


class Qmp:
    """A minimal QMP client over QEMU's ``-qmp unix:PATH,server=on,wait=off`` socket: the
    greeting, ``qmp_capabilities``, then one command at a time (events are skipped)."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        import socket as socket_module

        deadline = time.monotonic() + timeout
        while True:
            sock = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM)
            try:
                sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    raise QmpError(f"no QMP monitor at {path} after {timeout:.0f}s") from None
                time.sleep(0.1)
        sock.settimeout(timeout)
        self._file = sock.makefile("rwb")
        self._sock = sock
        self._read()  # the greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, object]:
        line = self._file.readline()
        if not line:
            raise QmpError("QMP monitor closed")
        obj: dict[str, object] = json.loads(line)
        return obj

    def execute(self, command: str, **arguments: object) -> object:
        msg: dict[str, object] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._file.write(json.dumps(msg).encode() + b"\n")
        self._file.flush()
        while True:
            reply = self._read()
            if "event" in reply:
                continue
            if "error" in reply:
                raise QmpError(f"{command}: {reply['error']}")
            return reply.get("return")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
            self._sock.close()


def run_vm(
    guest: Guest,
    script: str,
    *,
    socket: Path,
    workdir: Path,
    name: str = "vm",
    backend: Backend | None = None,
    smp: int = 1,
    memory_mib: int = 512,
    num_queues: int = 1,
    timeout: float | None = None,
    accel: str | None = None,
    reconnect: bool = False,
    files: Mapping[str, bytes] | None = None,
    on_console_line: Callable[[str], None] | None = None,
) -> VmResult:
    """Boot ``guest`` with ``script`` as ``/test.sh`` against the backend on ``socket``.

    ``files`` (guest path -> bytes) are added to the initramfs beside the script.
    Waits for QEMU to exit (the guest powers off when the script ends), at most ``timeout``
    seconds; kills QEMU on timeout or if ``backend`` dies. ``on_console_line`` sees each
    console line as it appears. Never raises for guest-side failures: inspect the result.
    """
    timeout = DEFAULT_VM_TIMEOUT if timeout is None else timeout
    accel = accel or os.environ.get("VUB_ACCEL", "tcg")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / f"{name}-test.sh").write_text(script)  # for whoever reads a failure
    initrd = guest.with_script(script, workdir / f"{name}-initrd.cpio", files)
    console_path = workdir / f"{name}-console.log"
    markers_path = workdir / f"{name}-markers.log"
    qemu_log = workdir / f"{name}-qemu.log"
    for p in (console_path, markers_path, qemu_log):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    argv = qemu_command(
        guest,
        initrd,
        socket=socket,
        console_path=console_path,
        markers_path=markers_path,
        smp=smp,
        memory_mib=memory_mib,
        num_queues=num_queues,
        reconnect=reconnect,
        accel=accel,
    )
    start = time.monotonic()
    proc = _spawn(argv, qemu_log)
    timed_out = backend_died = False
    pos = 0
    pending = b""
    try:
        while True:
            rc = proc.poll()
            if on_console_line is not None:
                pos, pending = _follow(console_path, pos, pending, on_console_line)
            if rc is not None:
                break
            if time.monotonic() - start > timeout:
                timed_out = True
                break
            if backend is not None and not backend.alive():
                # Give QEMU a moment to notice the closed socket on its own, then stop it.
                time.sleep(1.0)
                if proc.poll() is None:
                    backend_died = True
                    break
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            _kill_group(proc, signal.SIGKILL)
            proc.wait()
        else:
            _kill_group(proc, signal.SIGKILL)
    if on_console_line is not None:
        pos, pending = _follow(console_path, pos, pending, on_console_line)
        if pending:
            on_console_line(pending.decode(errors="replace").rstrip("\r\n"))
    result = VmResult(
        qemu_returncode=None if timed_out or backend_died else proc.returncode,
        timed_out=timed_out,
        backend_died=backend_died,
        duration=time.monotonic() - start,
        console_path=console_path,
        qemu_log_path=qemu_log,
    )
    with contextlib.suppress(FileNotFoundError):
        parse_markers(markers_path.read_text(errors="replace"), result)
    with contextlib.suppress(FileNotFoundError):
        initrd.unlink()  # ~90 MiB each; the script stays beside the logs
    return result


def _follow(
    path: Path, pos: int, pending: bytes, on_line: Callable[[str], None]
) -> tuple[int, bytes]:
    try:
        with open(path, "rb") as f:
            f.seek(pos)
            data = f.read()
    except FileNotFoundError:
        return pos, pending
    pos += len(data)
    pending += data
    *lines, pending = pending.split(b"\n")
    for line in lines:
        on_line(line.decode(errors="replace").rstrip("\r"))
    return pos, pending


def spawn_qemu(argv: Sequence[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start a QEMU that :func:`run_vm` does not wait for (a migration has two at once): its
    own process group and the parent-death signal, like every process here. Stop it with
    :func:`terminate`."""
    return _spawn(argv, log_path)


def console_lines(path: Path) -> Callable[[], list[str]]:
    """A reader of the lines a console file gained since the last call."""
    state: tuple[int, bytes] = (0, b"")
    out: list[str] = []

    def read() -> list[str]:
        nonlocal state
        out.clear()
        state = _follow(path, state[0], state[1], out.append)
        return list(out)

    return read


@contextlib.contextmanager
def short_tmpdir(prefix: str = "vub-") -> Iterator[Path]:
    """A short-named directory for sockets: AF_UNIX paths are limited to 107 bytes, which deep
    pytest ``tmp_path`` directories can exceed."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
