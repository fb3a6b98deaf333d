"""One thread per started virtqueue: wait for kicks, submit chains, reap completions, signal.

The worker pops every chain the driver made available and submits each to the device
(``VhostUserDevice.submit_chain``), which may complete it at once or later from another thread;
completions are returned to the used ring in the order they finish (virtio 2.7.8 allows any),
so one slow request (a flush, a read that misses the cache) never holds back the requests
behind it, and a disk sees the guest's queue depth. A thread per queue keeps the queues apart.
Completions from other threads reach the worker through a deque and an eventfd of its own; the
worker alone touches the ring.
The worker owns nothing it did not create: the kick fd, the call fd and the queue belong to the
connection, which stops the worker (:meth:`QueueWorker.stop`, which waits for the request in
progress to finish and be returned to the used ring) before closing or replacing any of them.
The call fd is the exception that can change while the queue runs (QEMU swaps it when the
guest masks an interrupt): :meth:`QueueWorker.set_call_fd` swaps it under a lock, so the worker
never writes to an fd number the connection has closed and the kernel reused.

The kick and call fds are the front-end's (see ``vhost_user.eventfd``): reads of the kick fd
never block, and a write to the call fd blocks only if the front-end fills the counter at the
wrong moment. Whoever then needs the worker (:meth:`stop`, :meth:`set_call_fd`) drains that
counter itself, which lets the write finish: a front-end cannot wedge the connection thread.
"""

from __future__ import annotations

import collections
import os
import select
import threading
import time
from typing import TYPE_CHECKING

import structlog

from vhost_user import eventfd
from vhost_user.device import Completion, FastPath, VhostUserDevice
from vhost_user.errors import GuestFault

if TYPE_CHECKING:
    from memory import GuestMemory
    from vhost_user.ring.virtqueue import Virtqueue

log = structlog.get_logger(__name__)

_UNJAM_INTERVAL = 0.2
"""How often a thread waiting for the worker checks whether the front-end blocked it."""
STUCK_LIMIT = 2.0
"""How long a worker may stay blocked in a call write, unjamming notwithstanding, before it is
abandoned: a front-end that refills its counter as fast as we drain it can keep it there."""


SPIN_LIMIT = 1024
"""Consecutive kicks that find nothing to do and leave the kick fd readable (see ``_run``)
before the queue is stopped as broken."""


class WorkerStuck(Exception):
    """The front-end keeps the worker blocked on its call eventfd (see :data:`STUCK_LIMIT`)."""


NOTIFY_EVERY = 64
"""In a long batch, decide whether to notify the driver at least this often, so the guest can
start completing requests while the batch goes on."""


class QueueWorker:
    """Serves queue ``index`` of ``device`` on its own thread until stopped or broken."""

    def __init__(
        self,
        index: int,
        queue: Virtqueue,
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
        self._call_writing = False
        self._notify_requested = False
        self._stopping = threading.Event()
        # Ours alone (the front-end never sees it): wakes the thread to stop or to notify.
        self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        # Completions: (head, used length) appended by whichever thread finished the request,
        # then _done_fd written (unless it is the worker itself, which reaps before it waits).
        self._done: collections.deque[tuple[int, int]] = collections.deque()
        self._done_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        # Held to append-and-signal, and to close _done_fd: a completion never writes to the
        # fd number after it was closed (and maybe reused for something else).
        self._done_lock = threading.Lock()
        self._outstanding = 0
        """Chains submitted and not yet reaped (worker thread only)."""
        self._fast: FastPath | None = None
        self.broken = False
        self.abandoned = False
        self.log = (logger if logger is not None else log).bind(queue=index)
        self._thread = threading.Thread(
            target=self._run, name=f"vhost-user-queue-{index}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop popping, wait for every submitted request to complete; returns once the
        thread has finished.

        Every chain the worker popped is back in the used ring (and the driver notified if it
        asked) when this returns, so ``queue.next_avail_idx`` is the exact resume point.
        """
        if self._wake_fd < 0:
            return
        self._stopping.set()
        os.eventfd_write(self._wake_fd, 1)
        if self._thread.ident is not None:
            stuck_since: float | None = None
            while True:
                self._thread.join(_UNJAM_INTERVAL)
                if not self._thread.is_alive():
                    break
                # Still busy: a request in progress (then we wait for it), or a call write
                # the front-end made block (then draining its counter lets it finish).
                if not self._call_writing:
                    stuck_since = None
                    continue
                self._unjam_call()
                now = time.monotonic()
                stuck_since = now if stuck_since is None else stuck_since
                if now - stuck_since >= STUCK_LIMIT:
                    # Safe to leave behind: every chain it popped is in the used ring already
                    # (it notifies only after pushing), and once its write returns it sees
                    # _stopping and ends without touching the ring or any fd again.
                    self.log.error("abandoning a queue worker the front-end keeps blocked")
                    # Requests still on I/O threads are lost to the ring (they complete into a
                    # worker that is gone): only a front-end that jams its call fd gets that.
                    self.abandoned = True
                    break
        os.close(self._wake_fd)
        self._wake_fd = -1
        # _done_fd is the thread's to close, when it ends (an abandoned one: once unstuck).

    def set_call_fd(self, call_fd: int | None) -> int | None:
        """Swap the call eventfd; returns the previous one (the caller closes it).

        :class:`WorkerStuck` if the front-end keeps the worker blocked on the old one: then
        stop this worker (it is abandoned) and start another."""
        deadline = time.monotonic() + STUCK_LIMIT
        while not self._call_lock.acquire(timeout=_UNJAM_INTERVAL):
            self._unjam_call()
            if time.monotonic() >= deadline:
                raise WorkerStuck(f"queue {self.index}: worker blocked on its call eventfd")
        try:
            old, self._call_fd = self._call_fd, call_fd
        finally:
            self._call_lock.release()
        return old

    def request_notify(self) -> None:
        """Have the worker signal the call fd once, whatever the driver asked (after a call
        fd swap: a completion signalled on the old fd may have gone unseen, and a spurious
        interrupt is harmless where a lost one hangs the guest)."""
        if self._wake_fd < 0:
            return
        self._notify_requested = True
        os.eventfd_write(self._wake_fd, 1)

    def _unjam_call(self) -> None:
        # Read without the lock: the worker holds it while it writes, so the fd number cannot
        # change under us (only set_call_fd changes it, and it is waiting for the lock).
        fd = self._call_fd
        if self._call_writing and fd is not None:
            try:
                eventfd.drain(fd)
            except OSError:
                pass

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        self.log.debug("queue worker started")
        try:
            try:
                self._fast = self.device.fast_path(self.index, self.queue, self.memory)
            except Exception:
                self.log.exception("the native data plane cannot serve this queue")
            if self._fast is not None:
                self.log.info("native data plane serves this queue")
            # Look at the ring before the first kick. The ring is fully set up when a worker
            # starts, and a restarted ring (new memory table, re-enabled, new kick fd) may have
            # requests whose kick was consumed earlier, or notifications left suppressed by
            # the previous worker so that the driver will not kick: one pass re-arms them.
            resumed = self.queue.used_idx != 0
            self._serve()
            if resumed:
                # A ring that was served before (a restart, a reconnect, a re-enable) may have
                # used entries the previous backend pushed and never signalled: it was killed
                # between the two, or it left the decision to a batch that never ended. The
                # driver sleeps until an interrupt nobody else will send (we signal only after
                # pushing, and with nothing to resubmit we push nothing). A spurious interrupt
                # is harmless (the driver finds no new used entry and sleeps again); a lost
                # one hangs the guest. A fresh ring (used index 0) has nothing unsignalled.
                self._signal_call()
            poller = select.poll()
            poller.register(self.kick_fd, select.POLLIN)
            poller.register(self._wake_fd, select.POLLIN)
            poller.register(self._done_fd, select.POLLIN)
            idle_kicks = 0
            while not self._stopping.is_set() and not self.broken:
                events = dict(poller.poll())
                if self._stopping.is_set():
                    break
                if self._done_fd in events:
                    eventfd.drain(self._done_fd)
                    self._serve()
                if self._wake_fd in events:
                    eventfd.drain(self._wake_fd)
                    if self._notify_requested:
                        self._notify_requested = False
                        self._signal_call()
                    continue  # look at _stopping first: the write may have blocked for long
                kick = events.get(self.kick_fd, 0)
                if kick & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                    self._break("kick fd is not usable (error or hang-up)")
                    break
                if kick & select.POLLIN:
                    value = eventfd.drain(self.kick_fd)
                    if self._serve() or value != 1 or not eventfd.readable(self.kick_fd):
                        idle_kicks = 0
                        continue
                    # A kick fd that reads 1 and stays readable, with nothing to do, again and
                    # again, counts down like an EFD_SEMAPHORE eventfd (refused where fdinfo
                    # tells; older kernels do not): polling it would spin forever.
                    idle_kicks += 1
                    if idle_kicks >= SPIN_LIMIT:
                        self._break("kick fd never empties (an EFD_SEMAPHORE eventfd?)")
                        break
        except Exception:
            # A bug of ours, not the guest's: keep the process and the other queues alive.
            self.log.exception("queue worker crashed")
            self.broken = True
        try:
            if not self.abandoned:  # else another worker may own the ring by now
                self._drain_outstanding()
        except Exception:
            self.log.exception("queue worker crashed returning requests")
            self.broken = True
        finally:
            with self._done_lock:
                os.close(self._done_fd)
                self._done_fd = -1
            if self._fast is not None:
                self._fast.close()
                self._fast = None
        self.log.debug("queue worker stopped", broken=self.broken)

    def _drain_outstanding(self) -> None:
        """Stopping (or broken): wait for every submitted request, returning each to the used
        ring, so that the ring stops with nothing popped and unreturned. A broken queue still
        returns what completes (the guest gets its answers; the front-end resets it after)."""
        poller = select.poll()
        poller.register(self._done_fd, select.POLLIN)
        while self._outstanding:
            if self._reap():
                self._notify()
                continue
            poller.poll(_UNJAM_INTERVAL * 1000)
            eventfd.drain(self._done_fd)

    def _break(self, reason: str, **kw: object) -> None:
        self.log.error("queue broken: stopped until the front-end resets it", reason=reason, **kw)
        self.broken = True

    def _completion(self, head: int) -> Completion:
        worker = threading.get_ident()

        def complete(length: int) -> None:
            with self._done_lock:
                self._done.append((head, length))
                if threading.get_ident() != worker and self._done_fd >= 0:
                    os.eventfd_write(self._done_fd, 1)  # never blocks: we drain it each wake

        return complete

    def _reap(self) -> int:
        """Return completed requests to the used ring, in the order they completed."""
        queue = self.queue
        reaped = 0
        done = self._done
        while done:
            head, length = done.popleft()
            self._outstanding -= 1
            if length < 0:
                self._break("device failed a request", head=head)
                continue
            queue.push_used(head, length)
            reaped += 1
            if reaped % NOTIFY_EVERY == 0:
                self._notify()
                if self.abandoned:  # the write blocked until stop() gave up on us
                    break
        return reaped

    def _serve(self) -> int:
        """Reap what completed, submit everything available, with the suppress/re-check
        dance of virtio 2.7.10; returns how many chains were submitted or reaped."""
        queue = self.queue
        worked = 0
        while not self._stopping.is_set() and not self.broken:
            queue.disable_notifications()
            progress = self._reap()
            fast = self._fast
            writes = self.memory.writes
            while not self._stopping.is_set() and not self.broken:
                # The native plane first (not while dirty pages are logged: then every write
                # into guest memory goes through Python's choke point); it stops at the first
                # chain it leaves to the Python path, which pops it below.
                if fast is not None and not writes.active:
                    if self._done:
                        progress += self._reap()  # what Python completed goes back first
                    try:
                        served, punted, notify = fast.serve(NOTIFY_EVERY)
                    except Exception:
                        # A bug of ours; the ring state is the queue's own between calls, so
                        # the Python path carries on alone.
                        self.log.exception("the native data plane failed: Python serves on")
                        fast.close()
                        self._fast = fast = None
                        continue
                    progress += served
                    if notify:
                        self._signal_call()
                    if punted:
                        pass  # the chain at the head is the Python path's: pop it below
                    elif served == NOTIFY_EVERY or notify:
                        continue
                    else:
                        break
                try:
                    chain = queue.pop()
                except GuestFault as exc:
                    self._break("guest broke the ring", error=str(exc))
                    break
                if chain is None:
                    break
                self._outstanding += 1
                progress += 1
                try:
                    self.device.submit_chain(
                        self.index, self.memory, chain, self._completion(chain.head)
                    )
                except Exception:
                    self.log.exception("device failed a request", head=chain.head)
                    self._outstanding -= 1
                    self._break("device raised")
                    break
                if len(self._done) >= NOTIFY_EVERY:
                    progress += self._reap()  # inline completions: let the guest start on them
            progress += self._reap()
            if progress:
                self._notify()
            worked += progress
            if self._stopping.is_set() or self.broken:
                return worked
            if progress:
                continue
            # Re-enabling notifications races with the driver adding buffers: if it added any
            # after our last pop, it may not kick (it saw notifications off), so look again.
            if not queue.enable_notifications():
                return worked
        return worked

    def _notify(self) -> None:
        if self.queue.should_notify():
            self._signal_call()

    def _signal_call(self) -> None:
        with self._call_lock:
            if self._call_fd is None:
                return
            self._call_writing = True
            try:
                eventfd.signal(self._call_fd)  # False: full, a notification is pending anyway
            except OSError as exc:
                if not self._call_failed:  # once per worker: a front-end can make it repeat
                    self._call_failed = True
                    self.log.warning("cannot signal the call fd", error=str(exc))
            finally:
                self._call_writing = False
