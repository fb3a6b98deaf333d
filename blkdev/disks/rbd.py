"""Ceph RBD images, through librbd (``blkdev/native/rbd_shim.c``, cffi in API mode).

An image is named as QEMU names it: ``rbd:POOL/IMAGE[@SNAP][:KEY=VALUE...]``, where ``conf``
is the ceph.conf to read, ``id`` the client (``admin`` when not given) and every other key a
librados option set after the file is read (``rados_osd_op_timeout=5``). ``\\`` escapes the next
character (a ``:``, ``@`` or ``/`` in a name). :func:`parse_spec` is pure; a snapshot is served
read-only.

Data moves straight between guest memory and librbd: ``rbd_aio_readv``/``rbd_aio_writev`` take
iovecs over the request's locked guest pages, which stay locked until librbd is done with them.
Requests are asynchronous (:class:`blkdev.disks.disk.AsyncDisk`): RBD's latency is a network
round trip or more, so a queue keeps as many requests in flight as the guest sends. Completions
never run Python on librbd's threads: librbd queues each one and writes an eventfd
(``rbd_set_image_notification``); the disk's reaper thread collects them
(``rbd_poll_io_events``) and calls each request's ``done``.

Caching. librbd's write-back cache is off (``rbd_cache=false``) unless the spec turns it on: a
completed write is then in the cluster, so a killed backend loses nothing the guest saw
complete, flushed or not (with it on, only flushed writes survive a kill).

Timeouts. With librados's defaults a request to an unreachable cluster waits forever, and so
would the guest. Unless the spec sets them, :data:`DEFAULT_TIMEOUT` seconds bound an OSD
operation (``rados_osd_op_timeout``: the request then fails with IOERR), a monitor operation
(``rados_mon_op_timeout``) and the first connection (``client_mount_timeout``). 0 waits forever.

A resize by another client (``rbd resize``) is seen through librbd's header watch
(``rbd_update_watch``, whose C callback only writes an eventfd) and reaches the guest like a
grown block device (``Disk.follow_size``, ``blkdev.resize``).
"""

from __future__ import annotations

import errno
import os
import select
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import structlog

from blkdev import native
from blkdev.disks.disk import SECTOR_SIZE, DiskDone
from blkdev.errors import DiskIOError, ImageError, ResizeRefused
from memory import IoBuffers

log = structlog.get_logger(__name__)

SCHEME: Final = "rbd"
DEFAULT_TIMEOUT: Final = 30
"""Seconds an OSD or monitor operation, or the first connection, may take unless the spec
says otherwise (see the module docstring)."""
_DEFAULTS: Final = (
    *((key, str(DEFAULT_TIMEOUT)) for key in ("rados_osd_op_timeout", "rados_mon_op_timeout")),
    ("client_mount_timeout", str(DEFAULT_TIMEOUT)),
    # librbd's own write-back cache holds completed writes in this process until a flush: a
    # backend killed (or upgraded) would lose writes the guest saw complete, which the host's
    # page cache, surviving the process, never does for a file. Off unless the spec asks.
    ("rbd_cache", "false"),
)
_MAX_IOVS: Final = 1024
_REAP_BATCH: Final = 64
CLOSE_TIMEOUT: Final = 60.0
"""How long closing waits for requests librbd still holds (each is bounded by the OSD timeout)."""


# -- the spec ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RbdSpec:
    """What ``rbd:POOL/IMAGE[@SNAP][:KEY=VALUE...]`` names (without the ``rbd:``)."""

    pool: str
    image: str
    snap: str | None = None
    conf: str | None = None
    user: str | None = None
    """The client id (``id=``); librados's ``admin`` when None."""
    options: tuple[tuple[str, str], ...] = field(default=())
    """Other librados options, in the order given."""

    def rados_options(self) -> list[tuple[str, str]]:
        """The options to set: the spec's, then our defaults for what it left out."""
        given = dict(self.options)
        return [*self.options, *((k, v) for k, v in _DEFAULTS if k not in given)]

    def __str__(self) -> str:
        return format_spec(self)


_SPECIAL: Final = "\\:@/="


def _escape(text: str, special: str = _SPECIAL) -> str:
    return "".join("\\" + c if c in special else c for c in text)


def _split(text: str, seps: str) -> list[tuple[str, str]]:
    """``text`` cut at every unescaped separator in ``seps``: (separator before, piece)
    pairs, the first with separator ""; escapes are resolved in the pieces."""
    out: list[tuple[str, str]] = []
    sep, piece = "", []
    chars = iter(text)
    for c in chars:
        if c == "\\":
            nxt = next(chars, None)
            if nxt is None:
                raise ValueError("the image spec ends with a lone '\\'")
            piece.append(nxt)
        elif c in seps:
            out.append((sep, "".join(piece)))
            sep, piece = c, []
        else:
            piece.append(c)
    out.append((sep, "".join(piece)))
    return out


def parse_spec(text: str) -> RbdSpec:
    """Parse ``POOL/IMAGE[@SNAP][:KEY=VALUE...]`` (what follows ``rbd:``); ValueError saying
    what is wrong. Pure."""
    # Options first: they follow the first unescaped ':' and may hold '/' and '@' (a path).
    head, sep, rest = _cut_unescaped(text, ":")
    parts = _split(head, "/@")
    if len(parts) < 2 or parts[1][0] != "/":
        raise ValueError(f"rbd image {text!r} is not POOL/IMAGE[@SNAP][:KEY=VALUE...]")
    pool = parts[0][1]
    image = parts[1][1]
    snap: str | None = None
    for s, piece in parts[2:]:
        if s == "/":
            raise ValueError(
                f"rbd image {text!r}: namespaces (POOL/NAMESPACE/IMAGE) are not supported"
            )
        if snap is not None:
            raise ValueError(f"rbd image {text!r} names two snapshots")
        snap = piece
    for what, value in (("pool", pool), ("image", image)):
        if not value:
            raise ValueError(f"rbd image {text!r} has an empty {what} name")
    if snap == "":
        raise ValueError(f"rbd image {text!r} has an empty snapshot name")
    conf = user = None
    options: list[tuple[str, str]] = []
    if sep:
        for option in _split_options(rest, text):
            key, value = option
            if key == "conf":
                conf = value
            elif key == "id":
                user = value
            elif key in dict(options):
                raise ValueError(f"rbd image {text!r} sets {key} twice")
            else:
                options.append((key, value))
    return RbdSpec(pool, image, snap, conf, user, tuple(options))


def _cut_unescaped(text: str, sep: str) -> tuple[str, str, str]:
    i = 0
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == sep:
            return text[:i], sep, text[i + 1 :]
        i += 1
    return text, "", ""


def _split_options(rest: str, text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    remaining = rest
    while True:
        option, sep, remaining = _cut_unescaped(remaining, ":")
        pieces = _split(option, "=")
        if len(pieces) != 2 or not pieces[0][1]:
            raise ValueError(f"rbd image {text!r}: option {option!r} is not KEY=VALUE")
        key, value = pieces[0][1], pieces[1][1]
        if key in ("conf", "id") and any(k == key for k, _ in out):
            raise ValueError(f"rbd image {text!r} sets {key} twice")
        out.append((key, value))
        if not sep:
            return out


def format_spec(spec: RbdSpec) -> str:
    """The spec's text, which :func:`parse_spec` reads back to ``spec``."""
    text = f"{_escape(spec.pool)}/{_escape(spec.image)}"
    if spec.snap is not None:
        text += "@" + _escape(spec.snap)
    pairs = []
    if spec.conf is not None:
        pairs.append(("conf", spec.conf))
    if spec.user is not None:
        pairs.append(("id", spec.user))
    pairs += spec.options
    for key, value in pairs:
        text += f":{_escape(key)}={_escape(value)}"
    return text


# -- the disk ----------------------------------------------------------------------------------


def _lib() -> tuple[Any, Any]:
    mod = native.rbd()
    if mod is None:
        raise ImageError(
            "rbd images need the librbd binding: install librbd-dev and librados-dev, then "
            "run python -m blkdev.native.build"
        )
    return mod.ffi, mod.lib


def _error(what: str, result: int) -> str:
    return f"{what}: {os.strerror(-result)}"


class _Pending:
    """A request librbd holds: what to call, and what must live until then."""

    __slots__ = ("done", "keep", "locked")

    def __init__(self, done: DiskDone, locked: Any = None, keep: Any = None) -> None:
        self.done = done
        self.locked = locked
        self.keep = keep


class RbdDisk:
    """A Disk, and an AsyncDisk, over one RBD image (see the module docstring)."""

    format_name: Final = "rbd"
    network: Final = True
    """librados's connections to the monitors and OSDs (``blkdev.netstats``)."""

    def __init__(self, spec: RbdSpec, *, read_only: bool = False) -> None:
        ffi, lib = _lib()
        self._ffi, self._lib = ffi, lib
        self.spec = spec
        self._read_only = read_only or spec.snap is not None
        self._name = f"{spec.pool}/{spec.image}" + (f"@{spec.snap}" if spec.snap else "")
        options = spec.rados_options()
        keep = [ffi.new("char[]", k.encode()) for k, _ in options]
        keep += [ffi.new("char[]", v.encode()) for _, v in options]
        keys = ffi.new("char *[]", keep[: len(options)])
        values = ffi.new("char *[]", keep[len(options) :])
        cluster = ffi.new("void **")
        r = lib.vub_rbd_connect(
            spec.conf.encode() if spec.conf is not None else ffi.NULL,
            spec.user.encode() if spec.user is not None else ffi.NULL,
            keys,
            values,
            len(options),
            cluster,
        )
        if r < 0:
            raise ImageError(_error(f"cannot connect to the Ceph cluster for {self._name}", r))
        self._cluster = cluster[0]
        ioctx, image = ffi.new("void **"), ffi.new("void **")
        r = lib.vub_rbd_open(
            self._cluster,
            spec.pool.encode(),
            spec.image.encode(),
            spec.snap.encode() if spec.snap is not None else ffi.NULL,
            int(self._read_only),
            ioctx,
            image,
        )
        if r < 0:
            lib.vub_rbd_shutdown(self._cluster)
            raise ImageError(_error(f"cannot open rbd image {self._name}", r))
        self._ioctx, self._image = ioctx[0], image[0]
        self._closed = False
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._next_token = 1
        self._idle = threading.Condition(self._lock)
        self._efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._watch_stop: Callable[[], None] | None = None
        try:
            self._size = self._query(lib.vub_rbd_size, "size")
            self._object_size = self._query(lib.vub_rbd_object_size, "object size")
            r = lib.vub_rbd_notify_fd(self._image, self._efd)
            if r < 0:
                raise ImageError(_error(f"cannot get completions of {self._name}", r))
        except BaseException:
            self._release_handles()
            raise
        self._reaper = threading.Thread(target=self._reap_loop, name="rbd-reaper", daemon=True)
        self._reaper.start()

    @classmethod
    def open(cls, target: str, *, read_only: bool = False) -> RbdDisk:
        """Open ``target`` (the spec after ``rbd:``); ImageError when it cannot."""
        try:
            spec = parse_spec(target)
        except ValueError as exc:
            raise ImageError(str(exc)) from None
        return cls(spec, read_only=read_only)

    def _query(self, fn: Callable[[Any, Any], int], what: str) -> int:
        out = self._ffi.new("uint64_t *")
        r = fn(self._image, out)
        if r < 0:
            raise ImageError(_error(f"cannot read the {what} of {self._name}", r))
        return int(out[0])

    # -- properties ------------------------------------------------------------------------

    @property
    def discard_granularity(self) -> int:
        # librbd skips the parts of a discard that do not cover whole objects
        # (rbd_skip_partial_discard): only whole objects free space.
        return max(SECTOR_SIZE, self._object_size)

    @property
    def size(self) -> int:
        return self._size - self._size % SECTOR_SIZE

    @property
    def read_only(self) -> bool:
        return self._read_only

    @property
    def supports_discard(self) -> bool:
        return not self._read_only

    @property
    def supports_write_zeroes(self) -> bool:
        return not self._read_only

    @property
    def rdev(self) -> int | None:
        return None

    @property
    def cached_io(self) -> bool:
        return False

    @property
    def journal_size(self) -> int:
        return 0  # a completed write is in the cluster (librbd's cache off, the default here)

    @property
    def aio(self) -> RbdDisk:
        return self

    def fast_target(self) -> tuple[int, int, int] | None:
        return None

    def attach_journal(self, region: memoryview | None) -> None:
        pass

    def read_cached(self, offset: int, buffers: IoBuffers) -> bool:
        return False

    def write_cached(self, offset: int, buffers: IoBuffers) -> bool:
        return False

    # -- asynchronous requests ---------------------------------------------------------------

    def _check(self, offset: int, length: int, write: bool) -> None:
        if self._closed:
            raise ValueError("disk is closed")
        if write and self._read_only:
            raise ValueError(f"{self._name} is read-only")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"request {offset}+{length} outside the {self.size}-byte image")

    def _submit(
        self,
        op: int,
        pending: _Pending,
        iov: Any = None,
        n: int = 0,
        offset: int = 0,
        length: int = 0,
    ) -> None:
        with self._lock:
            token = self._next_token
            self._next_token += 1
            # Registered before librbd has it: its completion may be reaped before we return.
            self._pending[token] = pending
        r = self._lib.vub_rbd_submit(
            self._image, op, iov if iov is not None else self._ffi.NULL, n, offset, length, token
        )
        if r < 0:
            with self._lock:
                del self._pending[token]
                self._idle.notify_all()
            self._unlock(pending)
            raise DiskIOError(_error(f"rbd request on {self._name} not started", r), -r)

    def _vectored(self, op: int, offset: int, buffers: IoBuffers, done: DiskDone) -> None:
        reading = op == self._lib.VUB_RBD_READ
        self._check(offset, len(buffers), not reading)
        if len(buffers) == 0:
            done(0)
            return
        ffi = self._ffi
        locked = buffers.lock(reading)
        try:
            views = [v for v in locked.io_vecs() if len(v)]
            if len(views) > _MAX_IOVS:
                raise DiskIOError(f"request of {len(views)} pieces is too fragmented", errno.EINVAL)
            iov = ffi.new("struct iovec[]", len(views))
            ptrs = [ffi.from_buffer(v) for v in views]
            for i, (v, p) in enumerate(zip(views, ptrs, strict=True)):
                iov[i].iov_base = p
                iov[i].iov_len = len(v)
        except BaseException:
            locked.release()
            raise
        self._submit(op, _Pending(done, locked, (iov, ptrs)), iov, len(views), offset)

    def submit_read(self, offset: int, buffers: IoBuffers, done: DiskDone) -> None:
        self._vectored(self._lib.VUB_RBD_READ, offset, buffers, done)

    def submit_write(self, offset: int, buffers: IoBuffers, done: DiskDone) -> None:
        self._vectored(self._lib.VUB_RBD_WRITE, offset, buffers, done)

    def submit_flush(self, done: DiskDone) -> None:
        if self._closed:
            raise ValueError("disk is closed")
        self._submit(self._lib.VUB_RBD_FLUSH, _Pending(done))

    def submit_discard(self, offset: int, length: int, done: DiskDone) -> None:
        self._check(offset, length, True)
        self._submit(self._lib.VUB_RBD_DISCARD, _Pending(done), offset=offset, length=length)

    def submit_write_zeroes(self, offset: int, length: int, unmap: bool, done: DiskDone) -> None:
        self._check(offset, length, True)
        lib = self._lib
        op = lib.VUB_RBD_WRITE_ZEROES if unmap else lib.VUB_RBD_WRITE_ZEROES_THICK
        self._submit(op, _Pending(done), offset=offset, length=length)

    def _unlock(self, pending: _Pending) -> None:
        """After librbd is done with the request's memory: the cdata first (it exports the
        views), then the guest pages (which marks them dirty, during a migration)."""
        if pending.keep is not None:
            _, ptrs = pending.keep
            for p in ptrs:
                self._ffi.release(p)
            pending.keep = None
        if pending.locked is not None:
            pending.locked.release()
            pending.locked = None

    def _reap_loop(self) -> None:
        ffi, lib = self._ffi, self._lib
        tokens = ffi.new("uint64_t[]", _REAP_BATCH)
        results = ffi.new("int64_t[]", _REAP_BATCH)
        poller = select.poll()
        poller.register(self._efd, select.POLLIN)
        poller.register(self._stop_fd, select.POLLIN)
        while True:
            events = dict(poller.poll())
            if self._stop_fd in events:
                return
            try:
                os.eventfd_read(self._efd)
            except BlockingIOError:
                pass
            while True:
                n = lib.vub_rbd_reap(self._image, tokens, results, _REAP_BATCH)
                if n <= 0:
                    break
                for i in range(n):
                    self._finish(int(tokens[i]), int(results[i]))

    def _finish(self, token: int, result: int) -> None:
        with self._lock:
            pending = self._pending.pop(token, None)
            if not self._pending:
                self._idle.notify_all()
        if pending is None:
            log.error("librbd completed a request we do not know", token=token)
            return
        self._unlock(pending)
        try:
            pending.done(result)
        except Exception:
            log.exception("completing an rbd request failed")

    # -- synchronous requests (the Disk interface) -------------------------------------------

    def _wait(self, start: Callable[[DiskDone], None], what: str) -> None:
        finished = threading.Event()
        outcome: list[int] = []

        def done(result: int) -> None:
            outcome.append(result)
            finished.set()

        start(done)
        finished.wait()
        if outcome[0] < 0:
            raise DiskIOError(_error(f"{what} of {self._name} failed", outcome[0]), -outcome[0])

    def read(self, offset: int, buffers: IoBuffers) -> None:
        self._wait(lambda d: self.submit_read(offset, buffers, d), "read")

    def write(self, offset: int, buffers: IoBuffers) -> None:
        self._wait(lambda d: self.submit_write(offset, buffers, d), "write")

    def flush(self) -> None:
        if self._read_only:
            return
        self._wait(self.submit_flush, "flush")

    def discard(self, offset: int, length: int) -> None:
        self._wait(lambda d: self.submit_discard(offset, length, d), "discard")

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self._wait(lambda d: self.submit_write_zeroes(offset, length, unmap, d), "write-zeroes")

    # -- size --------------------------------------------------------------------------------

    def resize(self, new_size: int, *, force: bool = False) -> None:
        if self._read_only:
            raise ResizeRefused(f"{self._name} is read-only")
        if new_size <= 0 or new_size % SECTOR_SIZE:
            raise ResizeRefused(f"new size {new_size} is not a positive multiple of 512")
        if new_size < self.size and not force:
            raise ResizeRefused(
                f"shrinking {self._name} from {self.size} to {new_size} bytes loses data "
                "(force it if meant)"
            )
        r = self._lib.vub_rbd_resize(self._image, new_size)
        if r < 0:
            raise ResizeRefused(_error(f"rbd resize of {self._name} failed", r))
        self._size = self._query(self._lib.vub_rbd_size, "size")

    def refresh_size(self) -> int:
        try:
            self._size = self._query(self._lib.vub_rbd_size, "size")
        except ImageError as exc:
            log.warning("cannot read the image size", error=str(exc))
        return self.size

    def follow_size(self, changed: Callable[[], None]) -> Callable[[], None] | None:
        """Call ``changed`` (on a thread of ours) whenever the image's header changes, e.g.
        ``rbd resize`` by another client; returns the function that stops it."""
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        stop = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        handle = self._ffi.new("uint64_t *")
        r = self._lib.vub_rbd_watch(self._image, efd, handle)
        if r < 0:
            os.close(efd)
            os.close(stop)
            log.warning("cannot watch the image for resizes", error=os.strerror(-r))
            return None

        def loop() -> None:
            poller = select.poll()
            poller.register(efd, select.POLLIN)
            poller.register(stop, select.POLLIN)
            while stop not in dict(poller.poll()):
                os.eventfd_read(efd)
                try:
                    changed()
                except Exception:
                    log.exception("following an rbd resize failed")

        thread = threading.Thread(target=loop, name="rbd-watch", daemon=True)
        thread.start()
        watch_handle = int(handle[0])

        stopped = False

        def unwatch() -> None:
            # Called twice in a normal exit (the caller's stop, then close()): a second
            # eventfd_write/close would hit fds closed already, or reused by then.
            nonlocal stopped
            if stopped:
                return
            stopped = True
            os.eventfd_write(stop, 1)
            thread.join(5)
            if not self._closed:
                self._lib.vub_rbd_unwatch(self._image, watch_handle)
            if not thread.is_alive():
                os.close(efd)
                os.close(stop)

        self._watch_stop = unwatch
        return unwatch

    # -- closing -----------------------------------------------------------------------------

    def close(self) -> None:
        """Wait for what librbd still holds (bounded), flush, close image and connection."""
        if self._closed:
            return
        with self._lock:
            if self._pending and not self._idle.wait_for(lambda: not self._pending, CLOSE_TIMEOUT):
                log.error("closing with rbd requests outstanding", count=len(self._pending))
        if not self._read_only:
            try:
                self.flush()
            except DiskIOError as exc:
                log.error("flush at close failed", error=str(exc))
        if self._watch_stop is not None:
            self._watch_stop()
            self._watch_stop = None
        self._closed = True
        os.eventfd_write(self._stop_fd, 1)
        self._reaper.join(5)
        self._release_handles()

    def _release_handles(self) -> None:
        self._lib.vub_rbd_close(self._ioctx, self._image)
        self._lib.vub_rbd_shutdown(self._cluster)
        for fd in (self._efd, self._stop_fd):
            os.close(fd)


def rbd_image_info(image: str) -> dict[str, object]:
    """``image info`` of ``rbd:...``: what qemu-img info says of it, plus the object size."""
    disk = RbdDisk.open(image.removeprefix(f"{SCHEME}:"), read_only=True)
    try:
        return {
            "filename": image,
            "format": disk.format_name,
            "virtual-size": disk.size,
            "object-size": disk.discard_granularity,
            "snapshot": disk.spec.snap,
            "read-only": disk.spec.snap is not None,
        }
    finally:
        disk.close()
