"""The one place every device write into guest memory is reported: ``WriteTracker``.

Live migration needs dirty-page logging (vhost-user.rst, "Migration"): while the front-end has
VHOST_F_LOG_ALL on, every byte the backend stores into guest memory must set the bit of its
4 KiB page (VHOST_LOG_PAGE) in the shared log bitmap, and a used-ring store the same when the
ring was given VHOST_VRING_F_LOG. This module owns only the choke point those marks will go
through; there is no bitmap yet. Each ``GuestMemory`` owns one tracker (``GuestMemory.writes``)
and every writing path in ``memory`` reports to it:

- ``GuestMemory.write_at`` and ``write_u16``/``u32``/``u64``, after the store;
- a request's ``MemoryWriter`` (``write``, ``fill``, ``zero``; a ``BounceBuffer`` copied back
  to the guest goes through it), after the copy, one report per host segment;
- ``LockedIoBuffers`` locked for writing (the kernel writes into them in ``preadv``), when
  the lock is *released*, i.e. after the I/O: the whole locked range;
- writable ``GuestMemory.view``\\ s are not reported by ``memory``: their holder reports each
  store by guest address. The split ring does (``vhost_user.ring.split``: used elements,
  used->flags, used->idx, avail_event).

Ordering, the rule a dirty log needs: a report comes *after* the bytes are stored and *before*
anything that makes them visible to the guest (the used->idx store that publishes the used
element, §2.7.8.2). Marking before the store would race with the front-end, which reads and
clears the bitmap while we run: it could clear the bit between our mark and our store and then
never send the new data. That is why a writable lock reports on release and not on lock. (On
x86-64 stores are not reordered with stores; a C twin on a weakly ordered host puts a write
barrier between the data and the mark, as Linux vhost's ``log_write`` callers do.)

Cost when nothing is installed: every caller tests ``tracker.active`` (one attribute load) and
skips the call. A hook sees the writes reported while it is installed; it must not raise
(it runs inside the data path, between a store and the request's completion).
"""

from __future__ import annotations

from collections.abc import Callable

WriteHook = Callable[[int, int], None]
"""Called as ``hook(gpa, length)`` for ``length`` (> 0) guest bytes at ``gpa`` just written."""


class WriteTracker:
    """Where writes into one ``GuestMemory`` are reported; holds at most one hook.

    ``active`` is True while a hook is installed. Treat it as read-only (``install`` and
    ``remove`` set it): it is the one attribute the hot paths test before calling ``note``.
    """

    __slots__ = ("_hook", "active")

    def __init__(self) -> None:
        self._hook: WriteHook | None = None
        self.active = False

    def install(self, hook: WriteHook) -> None:
        """Route every later report to ``hook``. Raises ValueError if one is installed."""
        if self._hook is not None:
            raise ValueError("a write hook is already installed")
        self._hook = hook
        self.active = True

    def remove(self) -> None:
        """Stop reporting; idempotent."""
        self.active = False
        self._hook = None

    def note(self, gpa: int, length: int) -> None:
        """``length`` bytes of guest memory at ``gpa`` were written (see the module docstring
        for when). Callers test ``active`` first; this re-checks, so a call racing
        ``remove()`` is harmless."""
        hook = self._hook
        if hook is not None:
            hook(gpa, length)
