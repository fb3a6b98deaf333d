"""One thread per started virtqueue: wait for kicks, serve chains, signal the call eventfd.

A thread per queue keeps one slow request (a flush, a large read) from stalling the others.
The worker owns nothing it did not create: the kick fd, the call fd and the queue belong to the
connection, which stops the worker (:meth:`QueueWorker.stop`, which waits for the request in
progress to finish and be returned to the used ring) before closing or replacing any of them.
The call fd is the exception that can change while the queue runs (QEMU swaps it when the
guest masks an interrupt): :meth:`QueueWorker.set_call_fd` swaps it under a lock, so the worker
never writes to an fd number the connection has closed and the kernel reused.
"""

from __future__ import annotations

import os
import select
import threading
from typing import TYPE_CHECKING

import structlog

from vhost_user.device import VhostUserDevice
from vhost_user.errors import GuestFault

if TYPE_CHECKING:
    from memory import GuestMemory
    from vhost_user.virtqueue import SplitVirtqueue

log = structlog.get_logger(__name__)

NOTIFY_EVERY = 64
"""In a long batch, decide whether to notify the driver at least this often, so the guest can
start completing requests while the batch goes on."""


class QueueWorker:
    """Serves queue ``index`` of ``device`` on its own thread until stopped or broken."""

    def __init__(
        self,
        index: int,
        queue: SplitVirtqueue,
        memory: GuestMemory,
        device: VhostUserDevice,
        kick_fd: int,
        call_fd: int | None,
        *,
        logger: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        self.index = index
        self.queue = queue
        self.memory = memory
        self.device = device
        self.kick_fd = kick_fd
        self._call_fd = call_fd
        self._call_lock = threading.Lock()
        self._call_failed = False
        self._stopping = threading.Event()
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.broken = False
        self.log = (logger if logger is not None else log).bind(queue=index)
        self._thread = threading.Thread(
            target=self._run, name=f"vhost-user-queue-{index}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop after the request in progress; returns once the thread has finished.

        Every chain the worker popped is back in the used ring (and the driver notified if it
        asked) when this returns, so ``queue.next_avail_idx`` is the exact resume point.
        """
        if self._stop_fd < 0:
            return
        self._stopping.set()
        os.eventfd_write(self._stop_fd, 1)
        if self._thread.ident is not None:
            self._thread.join()
        os.close(self._stop_fd)
        self._stop_fd = -1

    def set_call_fd(self, call_fd: int | None) -> int | None:
        """Swap the call eventfd; returns the previous one (the caller closes it)."""
        with self._call_lock:
            old, self._call_fd = self._call_fd, call_fd
        return old

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        self.log.debug("queue worker started")
        try:
            # Look at the ring before the first kick. The ring is fully set up when a worker
            # starts, and a restarted ring (new memory table, re-enabled, new kick fd) may have
            # requests whose kick was consumed earlier, or notifications left suppressed by
            # the previous worker so that the driver will not kick: one pass re-arms them.
            self._serve()
            poller = select.poll()
            poller.register(self.kick_fd, select.POLLIN)
            poller.register(self._stop_fd, select.POLLIN)
            while not self._stopping.is_set() and not self.broken:
                events = dict(poller.poll())
                if self._stop_fd in events or self._stopping.is_set():
                    break
                kick = events.get(self.kick_fd, 0)
                if kick & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                    self._break("kick fd is not usable (error or hang-up)")
                    break
                if kick & select.POLLIN:
                    self._drain_kick()
                    self._serve()
        except Exception:
            # A bug of ours, not the guest's: keep the process and the other queues alive.
            self.log.exception("queue worker crashed")
            self.broken = True
        self.log.debug("queue worker stopped", broken=self.broken)

    def _drain_kick(self) -> None:
        # The connection checked that the kick fd is an eventfd and made it non-blocking: one
        # read resets its counter, and EAGAIN means another queue sharing the fd drained it.
        try:
            os.read(self.kick_fd, 8)
        except BlockingIOError:
            pass

    def _break(self, reason: str, **kw: object) -> None:
        self.log.error("queue broken: stopped until the front-end resets it", reason=reason, **kw)
        self.broken = True

    def _serve(self) -> None:
        """Drain the available ring, with the suppress/re-check dance of virtio 2.7.10."""
        queue = self.queue
        while not self._stopping.is_set() and not self.broken:
            queue.disable_notifications()
            pending = 0
            while not self._stopping.is_set():
                try:
                    chain = queue.pop()
                except GuestFault as exc:
                    self._break("guest broke the ring", error=str(exc))
                    break
                if chain is None:
                    break
                try:
                    length = self.device.handle_chain(self.index, self.memory, chain)
                except Exception:
                    self.log.exception("device failed a request", head=chain.head)
                    self._break("device raised")
                    break
                queue.push_used(chain.head, length)
                pending += 1
                if pending >= NOTIFY_EVERY:
                    self._notify()
                    pending = 0
            if pending:
                self._notify()
            if self._stopping.is_set() or self.broken:
                return
            # Re-enabling notifications races with the driver adding buffers: if it added any
            # after our last pop, it may not kick (it saw notifications off), so look again.
            if not queue.enable_notifications():
                return

    def _notify(self) -> None:
        if not self.queue.should_notify():
            return
        with self._call_lock:
            if self._call_fd is None:
                return
            try:
                os.eventfd_write(self._call_fd, 1)
            except BlockingIOError:
                pass  # the counter is full: the driver has a notification pending already
            except OSError as exc:
                if not self._call_failed:  # once per worker: a front-end can make it repeat
                    self._call_failed = True
                    self.log.warning("cannot signal the call fd", error=str(exc))
