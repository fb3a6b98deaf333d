"""What a vhost-user device backend implements; the connection drives it.

``vhost_user.connection`` handles the protocol (features, memory table, vrings, queue workers)
and knows nothing of block devices. A device (``blkdev.device.BlkDevice``) plugs in through this
protocol. It is deliberately small:

- Feature bits the device offers, and the config space, answer front-end messages.
- :meth:`VhostUserDevice.handle_chain` turns one descriptor chain into I/O and returns the number
  of bytes written into guest memory (the used-ring length). It is called from the per-queue
  worker thread of ``queue_index``; different queues call it concurrently, so the device must be
  thread-safe across queues. It must never raise for anything the guest controls: a guest fault
  fails that request (error status) and returns normally. Anything it does raise is a bug or a
  local fault: the worker logs it, marks the device broken (VIRTIO_CONFIG_S_NEEDS_RESET through
  the backend channel when available) and stops that queue, the process stays up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from memory import GuestMemory
from vhost_user.ring.chain import DescriptorChain
from vhost_user.ring.virtqueue import Virtqueue


class FastPath(Protocol):
    """A device's native data plane for one queue (``VhostUserDevice.fast_path``)."""

    def serve(self, budget: int) -> tuple[int, bool, bool]:
        """Serve up to ``budget`` chains from the head of the available ring, popping and
        pushing them itself (and, while busy, polling the ring a little for more); (how many,
        whether it stopped at a chain it leaves to ``submit_chain``, whether the driver is to
        be notified: it made that decision, the worker signals). Called on the queue's worker
        thread only."""
        ...

    def close(self) -> None: ...


Completion = Callable[[int], None]
"""Called once per submitted chain, from any thread, with its used length; a negative length
means the device failed (a bug or a local fault, logged): the worker breaks the queue."""


class VhostUserDevice(Protocol):
    @property
    def num_queues(self) -> int:
        """How many virtqueues the device serves (GET_QUEUE_NUM)."""
        ...

    @property
    def max_queue_size(self) -> int:
        """Largest SET_VRING_NUM accepted (a power of two <= 32768)."""
        ...

    def device_features(self) -> int:
        """Virtio feature bits the device offers, including the transport bits it supports
        (VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC, VIRTIO_RING_F_EVENT_IDX...). The
        connection adds VHOST_USER_F_PROTOCOL_FEATURES itself."""
        ...

    def set_acked_features(self, features: int) -> None:
        """The features the driver accepted (SET_FEATURES), before any queue starts."""
        ...

    def read_config(self, offset: int, size: int) -> bytes:
        """GET_CONFIG: exactly ``size`` bytes of config space from ``offset``; bytes past the
        device's layout read as zero. Raise ``ValueError`` if offset+size is absurd (> 4096)."""
        ...

    def write_config(self, offset: int, data: bytes) -> None:
        """SET_CONFIG: only writable fields change (virtio-blk: ``writeback``); others are
        ignored. Raise ``ValueError`` for an out-of-range offset."""
        ...

    def handle_chain(self, queue_index: int, memory: GuestMemory, chain: DescriptorChain) -> int:
        """Serve one request; return the used length. Never raises for guest faults."""
        ...

    def submit_chain(
        self, queue_index: int, memory: GuestMemory, chain: DescriptorChain, complete: Completion
    ) -> None:
        """Start serving one request and return; ``complete`` is called exactly once when it
        is done, maybe before this returns, maybe from another thread, and requests may
        complete in any order (virtio 2.7.8: the used ring need not follow the avail ring).
        :class:`InlineSubmit` serves it with :meth:`handle_chain` on the spot."""
        ...

    def fast_path(self, queue_index: int, queue: Virtqueue, memory: GuestMemory) -> FastPath | None:
        """A native data plane for the queue about to start, or None (every chain goes
        through :meth:`submit_chain`)."""
        ...

    def quiesce(self) -> None:
        """All queues are stopped (GET_VRING_BASE on every queue, disconnect, or shutdown):
        make completed writes durable if the device caches them. Errors are logged, not raised."""
        ...

    @property
    def inflight_state_size(self) -> int:
        """Bytes the device wants in the inflight area (INFLIGHT_SHMFD) for state of its own
        that must outlive the process as the area does (QEMU keeps the memfd and gives it to
        the next backend): a block device's journal of completed, unflushed metadata. 0: none."""
        ...

    def attach_inflight_state(self, region: memoryview | None) -> None:
        """The device's part of the inflight area, before any queue runs on it; a backend that
        died may have left state there to recover. None: the area goes away (detach before
        then). Errors are logged, not raised."""
        ...

    def release(self) -> None:
        """The front-end stopped every queue while logging dirty pages (VHOST_F_LOG_ALL): the
        device is being migrated away. Give up what the destination's backend needs (a block
        device: the image and its lock). :meth:`acquire` comes before any queue runs again.
        Errors are logged, not raised."""
        ...

    def acquire(self) -> None:
        """Before the first queue starts (at start, or after :meth:`release`): take back what
        release gave up; a no-op when held. Raising fails that queue's start (it stays
        stopped, and the error is logged)."""
        ...


class InlineSubmit:
    """``submit_chain`` as ``handle_chain`` on the caller's thread: a device with nothing to
    wait for (or a test) needs no more."""

    def handle_chain(self, queue_index: int, memory: GuestMemory, chain: DescriptorChain) -> int:
        raise NotImplementedError

    def submit_chain(
        self, queue_index: int, memory: GuestMemory, chain: DescriptorChain, complete: Completion
    ) -> None:
        complete(self.handle_chain(queue_index, memory, chain))

    def fast_path(self, queue_index: int, queue: Virtqueue, memory: GuestMemory) -> FastPath | None:
        return None
