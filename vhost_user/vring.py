"""The vrings of one connection: the per-queue state the front-end sets up, and its life cycle.

Glossary: a *vring* is the vhost-user state of one queue (size, addresses, base, eventfds,
enable), set by SET_VRING_* messages; the *virtqueue* is the virtio queue itself
(``vhost_user.ring``), made from a vring when it starts and served by its
:class:`~vhost_user.queue_worker.QueueWorker`.

Life cycle (vhost-user spec, "Ring states"): a ring runs once it has a size, addresses, a kick
eventfd and memory, and is enabled. With ``VHOST_USER_F_PROTOCOL_FEATURES`` negotiated rings
start disabled until ``SET_VRING_ENABLE 1``; without it they are enabled from the start.
A new worker looks at the ring once, then on every kick: the spec's "start the ring upon
receiving a kick" keeps a backend off a ring the front-end is still setting up, and the kick fd
is the last piece of that setup; the first look also re-arms notifications a previous worker
may have left suppressed (then the driver would never kick). Any change the front-end makes to
a ring pauses its worker first (the request in progress finishes, the position is kept) and
then starts a new one if the ring may still run. ``GET_VRING_BASE`` stops the ring: its worker
finishes the request in progress, and the reply carries the index of the next available entry,
the exact point to resume from. A memory-table change pauses every running ring, and each is
re-translated against the new memory and started again.

Blame: the size, base and addresses the front-end sends are checked here, on arrival and again
against the current memory before a start, and refused with FrontendProtocolError. So the
virtqueue factory only ever gets values its contract accepts, and a ``ValueError`` from it is a
bug of ours: it propagates (the server logs it and drops the connection).

fds: the connection hands each vring its kick/call/err eventfds already checked and kept (see
``vhost_user.connection``); from then on they are the vring's, closed when replaced, by
``GET_VRING_BASE`` (kick and call) and on :meth:`Vrings.close`. Workers never close anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from memory import GuestMemory, GuestMemoryError
from vhost_user.device import VhostUserDevice
from vhost_user.errors import FrontendProtocolError, GuestFault
from vhost_user.protocol import codec
from vhost_user.queue_worker import QueueWorker, WorkerStuck
from vhost_user.ring.features import VIRTIO_RING_F_EVENT_IDX, has
from vhost_user.ring.inflight import InflightArea
from vhost_user.ring.virtqueue import VirtqueueFactory
from vhost_user.transport import close_fds

MAX_SPLIT_RING_INDEX = 0xFFFF
"""Split ring indices are free-running u16 counters (virtio 1.2, 2.7.6)."""


def ring_lengths(num: int) -> tuple[int, int, int]:
    """Bytes of a split ring's descriptor table, available ring and used ring for ``num``
    entries, including the event-index words (virtio 1.2, 2.7.2)."""
    return 16 * num, 6 + 2 * num, 6 + 8 * num


@dataclass
class Vring:
    """What the front-end has set up for one queue, and the worker serving it if it runs."""

    index: int
    num: int = 0
    next_avail: int = 0
    used_idx: int | None = None
    addr: codec.SetVringAddr | None = None
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    enabled: bool = False
    broken: bool = False
    """Its worker gave up (guest fault or device error); cleared when the front-end
    reconfigures the ring."""
    worker: QueueWorker | None = None


class Vrings:
    """Every vring of one connection. Not thread-safe: the connection thread drives it."""

    def __init__(
        self,
        device: VhostUserDevice,
        virtqueue_factory: VirtqueueFactory,
        logger: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self.device = device
        self.log = logger
        self.rings = [Vring(i) for i in range(device.num_queues)]
        self.memory: GuestMemory | None = None
        """The mapping rings are translated against and run on (the connection's, see
        :meth:`set_memory`)."""
        self._virtqueue_factory = virtqueue_factory
        self._acked_features = 0
        self._ran_since_quiesce = False
        #: The front-end has VHOST_F_LOG_ALL on (set by the connection): stopping every queue
        #: now means the device is migrated away (VhostUserDevice.release).
        self.migrating = False
        #: The inflight area (SET_INFLIGHT_FD), one region per queue; set by the connection.
        self.inflight: InflightArea | None = None

    def get(self, index: int) -> Vring:
        """The vring of queue ``index``; FrontendProtocolError if the device has no such queue."""
        if not 0 <= index < len(self.rings):
            raise FrontendProtocolError(
                f"vring index {index} out of range (device has {len(self.rings)} queues)"
            )
        return self.rings[index]

    def set_features(self, acked_features: int) -> None:
        """SET_FEATURES: the virtio features rings start with from now on (event index) and
        whether PROTOCOL_FEATURES makes rings wait for SET_VRING_ENABLE."""
        self._acked_features = acked_features

    # -- front-end requests ----------------------------------------------------------------

    def set_num(self, ring: Vring, num: int) -> None:
        limit = self.device.max_queue_size
        if num == 0 or num & (num - 1) or num > limit:
            raise FrontendProtocolError(f"SET_VRING_NUM: {num} is not a power of two in 1..{limit}")
        self._reconfigure(ring, num=num)

    def set_addr(self, ring: Vring, addr: codec.SetVringAddr) -> None:
        if addr.flags & ~codec.VRING_F_LOG:
            raise FrontendProtocolError(f"SET_VRING_ADDR: unknown flags {addr.flags:#x}")
        self._pause(ring)
        previous, ring.addr = ring.addr, addr
        try:
            self._translate(ring)
        except FrontendProtocolError:
            ring.addr = previous
            raise
        self._reconfigure(ring)

    def set_base(self, ring: Vring, base: int) -> None:
        if base > MAX_SPLIT_RING_INDEX:
            raise FrontendProtocolError(f"SET_VRING_BASE: {base} is not a 16-bit index")
        self._reconfigure(ring, next_avail=base, used_idx=None)

    def get_base(self, ring: Vring) -> int:
        """GET_VRING_BASE: stop the ring; the index of the next available entry."""
        self._pause(ring)
        # Like libvhost-user, forget the eventfds: the ring restarts only with a new kick fd.
        close_fds([fd for fd in (ring.kick_fd, ring.call_fd) if fd is not None])
        ring.kick_fd = ring.call_fd = None
        # QEMU >= 7.2 disables a ring (SET_VRING_ENABLE 0) before GET_VRING_BASE, so the ring
        # may have been paused already: quiesce once the last ring that ran has stopped.
        if self._ran_since_quiesce and all(r.worker is None for r in self.rings):
            self._ran_since_quiesce = False
            self.device.quiesce()
            if self.migrating:
                # Every queue stopped while the front-end logs dirty pages: the VM stops to
                # finish a migration, and the destination's backend is about to start.
                self.device.release()
        self.log.debug("vring stopped", queue=ring.index, next_avail=ring.next_avail)
        return ring.next_avail

    def set_kick(self, ring: Vring, fd: int) -> None:
        """SET_VRING_KICK with a checked eventfd, now the ring's."""
        self._pause(ring)
        old, ring.kick_fd = ring.kick_fd, fd
        close_fds([] if old is None else [old])
        self._reconfigure(ring)

    def set_call(self, ring: Vring, fd: int | None) -> None:
        """SET_VRING_CALL with a checked eventfd (now the ring's) or none; a running worker
        takes it without stopping."""
        old, ring.call_fd = ring.call_fd, fd
        if ring.worker is not None:
            try:
                ring.worker.set_call_fd(fd)
            except WorkerStuck as exc:
                self.log.warning("replacing a blocked queue worker", error=str(exc))
                self._pause(ring)  # abandons it; a fresh one takes the new fd
                self._maybe_start(ring)
            # A completion may have been signalled on the old fd after the front-end stopped
            # listening to it; a spurious interrupt is harmless, a lost one hangs the guest.
            # The worker sends it: a write to the front-end's fd is not for this thread.
            if fd is not None and ring.worker is not None:
                ring.worker.request_notify()
        close_fds([] if old is None else [old])

    def set_err(self, ring: Vring, fd: int | None) -> None:
        """SET_VRING_ERR with a checked eventfd (now the ring's) or none."""
        old, ring.err_fd = ring.err_fd, fd
        close_fds([] if old is None else [old])

    def set_enable(self, ring: Vring, enable: bool) -> None:
        ring.enabled = enable
        if self._may_run(ring):
            self._maybe_start(ring)
        else:
            self._pause(ring)

    def disable_all(self) -> None:
        """RESET_OWNER (deprecated): the spec recommends treating it as "disable all rings"."""
        for ring in self.rings:
            self._pause(ring)
            ring.enabled = False

    # -- memory changes --------------------------------------------------------------------

    def pause_all(self) -> None:
        """Pause every running ring, so that no worker touches the current memory any more."""
        for ring in self.rings:
            self._pause(ring)

    def set_memory(self, memory: GuestMemory | None) -> None:
        """Run on ``memory`` from now on: re-translate every ring and start those that may run.

        Call :meth:`pause_all` first (then the previous mapping may be unmapped in between).
        A ring whose addresses are not in the new memory stays stopped until the front-end
        sets memory or addresses that work."""
        if any(ring.worker is not None for ring in self.rings):
            raise ValueError("Vrings.set_memory with rings running: pause_all first")
        self.memory = memory
        for ring in self.rings:
            self._maybe_start(ring)

    # -- teardown --------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every ring (in-flight requests finish) and close every eventfd. Idempotent."""
        self.pause_all()
        for ring in self.rings:
            close_fds([fd for fd in (ring.kick_fd, ring.call_fd, ring.err_fd) if fd is not None])
            ring.kick_fd = ring.call_fd = ring.err_fd = None
        self.memory = None

    # -- the life cycle --------------------------------------------------------------------

    def _may_run(self, ring: Vring) -> bool:
        if self._acked_features & codec.VHOST_USER_F_PROTOCOL_FEATURES:
            return ring.enabled
        return True

    def _translate(self, ring: Vring) -> tuple[int, int, int]:
        """Guest physical addresses of the ring's parts; FrontendProtocolError if any is not
        wholly inside guest memory or misaligned (virtio 1.2, 2.7: 16, 2 and 4 bytes)."""
        addr = ring.addr
        if addr is None or self.memory is None:
            raise FrontendProtocolError(f"vring {ring.index}: addresses set before memory table")
        num = max(ring.num, 1)
        desc_len, avail_len, used_len = ring_lengths(num)
        gpas = []
        for what, uva, length, align in (
            ("descriptor table", addr.desc_user_addr, desc_len, 16),
            ("available ring", addr.avail_user_addr, avail_len, 2),
            ("used ring", addr.used_user_addr, used_len, 4),
        ):
            if uva % align:
                raise FrontendProtocolError(
                    f"vring {ring.index}: {what} at {uva:#x} is not {align}-byte aligned"
                )
            try:
                gpas.append(self.memory.translate_uva(uva, length))
            except GuestMemoryError as exc:
                raise FrontendProtocolError(
                    f"vring {ring.index}: {what} at {uva:#x} (+{length:#x}) is not in guest "
                    f"memory: {exc}"
                ) from None
        # VRING_F_LOG: used-ring stores are logged at log_guest_addr, the used ring's guest
        # address (vhost-user.rst, "Migration"). The split ring reports them by the address it
        # translated, so the two must agree, or the log would mark the wrong pages.
        if addr.flags & codec.VRING_F_LOG and addr.log_guest_addr != gpas[2]:
            raise FrontendProtocolError(
                f"vring {ring.index}: log address {addr.log_guest_addr:#x} is not the used "
                f"ring's guest address {gpas[2]:#x}"
            )
        return gpas[0], gpas[1], gpas[2]

    def _maybe_start(self, ring: Vring) -> None:
        if ring.worker is not None or ring.broken:
            return
        if ring.kick_fd is None or ring.addr is None or ring.num == 0 or self.memory is None:
            return
        if not self._may_run(ring):
            return
        try:
            desc, avail, used = self._translate(ring)
        except FrontendProtocolError as exc:
            # After a memory change the ring may point at memory that is gone for now; it stays
            # stopped until the front-end sets memory or addresses that work.
            self.log.warning("vring cannot start", queue=ring.index, error=str(exc))
            return
        if not self._ran_since_quiesce:
            try:
                self.device.acquire()
            except Exception as exc:
                # Not the front-end's doing (another process holds the image): the queue stays
                # stopped and broken until the front-end sets it up again.
                self.log.error(
                    "vring cannot start: device unavailable", queue=ring.index, error=str(exc)
                )
                ring.broken = True
                return
        # Size and base were checked on arrival (set_num, set_base) and the used index is the
        # previous queue's: what the factory could refuse with ValueError is ours, and
        # propagates. GuestFault and GuestMemoryError are its verdict on the addresses it was
        # given (SplitVirtqueue: a part that lies at a misaligned host address, which only the
        # front-end's mmap offset causes), so the front-end's.
        region = None
        if self.inflight is not None:
            if ring.index >= self.inflight.num_queues or ring.num > self.inflight.queue_size:
                raise FrontendProtocolError(
                    f"vring {ring.index} of {ring.num} entries is not covered by the inflight "
                    f"area ({self.inflight.num_queues} queues of {self.inflight.queue_size})"
                )
            region = self.inflight.queues[ring.index]
        try:
            queue = self._virtqueue_factory(
                self.memory,
                ring.num,
                desc,
                avail,
                used,
                event_idx=has(self._acked_features, VIRTIO_RING_F_EVENT_IDX),
                next_avail_idx=ring.next_avail,
                used_idx=ring.used_idx,
                inflight=region,
            )
        except (GuestFault, GuestMemoryError) as exc:
            raise FrontendProtocolError(f"vring {ring.index}: cannot set up: {exc}") from None
        worker = QueueWorker(
            ring.index,
            queue,
            self.memory,
            self.device,
            ring.kick_fd,
            ring.call_fd,
            logger=self.log,
        )
        ring.worker = worker
        self._ran_since_quiesce = True
        worker.start()
        self.log.info("vring started", queue=ring.index, size=ring.num, base=ring.next_avail)

    def _pause(self, ring: Vring) -> bool:
        """Stop the ring's worker (in-flight request finished), keeping its position so it
        can resume. Returns whether a worker was running."""
        worker = ring.worker
        if worker is None:
            return False
        worker.stop()
        ring.worker = None
        ring.next_avail = worker.queue.next_avail_idx
        ring.used_idx = worker.queue.used_idx
        ring.broken = worker.broken
        self.log.debug("vring paused", queue=ring.index, next_avail=ring.next_avail)
        return True

    def _reconfigure(self, ring: Vring, **changes: object) -> None:
        """Apply front-end changes to a ring (pausing it if it runs), then try to start it."""
        self._pause(ring)
        for name, value in changes.items():
            setattr(ring, name, value)
        ring.broken = False
        self._maybe_start(ring)
