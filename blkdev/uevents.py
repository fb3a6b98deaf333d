"""Follow a host block device that grows by itself: kernel uevents through pyroute2.

An LVM volume extended with ``lvextend``, a SAN LUN grown on the array, a loop device after
``truncate`` and ``losetup -c``: the kernel re-reads the device's capacity and emits a uevent
``ACTION=change`` with ``RESIZE=1`` on the netlink uevent socket (NETLINK_KOBJECT_UEVENT, the
one udev listens to). :class:`ResizeWatcher` listens there for the one device it serves,
identified by its ``MAJOR``/``MINOR`` numbers (a name like ``dm-3`` can be reused; numbers are
what ``stat`` of the image path gives), and calls back once per event; the callback re-reads the
size itself, so a burst of events or one missed while the callback ran changes nothing.

:func:`is_resize_of` is the pure decision, tested on its own; the thread only moves messages.
"""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Callable, Mapping
from typing import Any

import structlog
from pyroute2 import UeventSocket

log = structlog.get_logger(__name__)

_POLL_S = 0.2
"""How often the watcher thread looks at its stop flag while no uevent arrives."""


def is_resize_of(event: Mapping[str, Any], major: int, minor: int) -> bool:
    """True when ``event`` (a uevent's key/value pairs) says block device major:minor was
    resized. Anything malformed is simply not a resize of ours."""
    try:
        return (
            event.get("ACTION") == "change"
            and event.get("SUBSYSTEM") == "block"
            and event.get("RESIZE") == "1"
            and int(event.get("MAJOR", -1)) == major
            and int(event.get("MINOR", -1)) == minor
        )
    except (TypeError, ValueError):
        return False


class ResizeWatcher:
    """Calls ``on_resize()`` from its own thread whenever block device ``rdev`` is resized.

    Start with :meth:`start`, end with :meth:`stop` (joins the thread, closes the socket).
    ``on_resize`` must not raise; if it does, the error is logged and watching goes on.
    """

    def __init__(self, rdev: int, on_resize: Callable[[], None], *, name: str = "") -> None:
        self._major, self._minor = os.major(rdev), os.minor(rdev)
        self._on_resize = on_resize
        self._stop = threading.Event()
        self._bound = threading.Event()
        self._bind_error: OSError | None = None
        self.log = log.bind(device=name or f"{self._major}:{self._minor}")
        self._thread = threading.Thread(target=self._run, name="uevents", daemon=True)

    def start(self, timeout: float = 5.0) -> None:
        """Start watching; returns once the socket listens (raises OSError if it cannot)."""
        self._thread.start()
        if not self._bound.wait(timeout):
            self._stop.set()
            raise OSError(f"uevent socket not bound after {timeout} s")
        if self._bind_error is not None:
            raise self._bind_error
        self.log.info("watching block device for resize")

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        # pyroute2 (0.9) runs each socket on an event loop of the thread that created it, so
        # the socket is made, used and closed on this thread only.
        try:
            sock = UeventSocket()
            sock.bind()
        except OSError as exc:
            self._bind_error = exc
            self._bound.set()
            return
        self._bound.set()
        try:
            self._watch(sock)
        finally:
            sock.close()

    def _watch(self, sock: UeventSocket) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([sock], [], [], _POLL_S)
                if not ready:
                    continue
                messages = sock.get()
            except (OSError, ValueError) as exc:
                if self._stop.is_set():
                    return
                # ENOBUFS: the kernel dropped events while we were slow. A resize among them
                # is not lost for good: we re-read the size now, which is what a resize
                # callback does anyway.
                self.log.warning("uevent socket error; re-reading the size", error=str(exc))
                self._fire()
                continue
            # dict(): pyroute2's message get() looks up netlink attributes, not the uevent's
            # KEY=VALUE pairs, which it stores as plain dict items.
            if any(is_resize_of(dict(m), self._major, self._minor) for m in messages):
                self._fire()

    def _fire(self) -> None:
        try:
            self._on_resize()
        except Exception:
            self.log.exception("resize callback failed")
