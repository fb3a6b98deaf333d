"""A tiny VhostUserDevice for protocol tests: echoes a chain's readable bytes, upper-cased,
into its writable buffers. It can hold requests (to test in-flight completion on stop) and
raise on demand (to test that a device bug breaks only its queue)."""

from __future__ import annotations

import threading

from memory import GuestMemory
from vhost_user.device import Completion, InlineSubmit
from vhost_user.ring.chain import DescriptorChain

VIRTIO_F_VERSION_1 = 1 << 32
VIRTIO_RING_F_EVENT_IDX = 1 << 29
BOOM = b"BOOM!"
"""A request starting with these bytes makes handle_chain raise."""


class EchoDevice(InlineSubmit):
    def __init__(
        self,
        *,
        num_queues: int = 2,
        max_queue_size: int = 256,
        features: int = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX,
    ) -> None:
        self._num_queues = num_queues
        self._max_queue_size = max_queue_size
        self.features = features
        self.acked: int | None = None
        self.config = bytearray(range(64))
        self.quiesced = 0
        self.handled = 0
        self.faults: list[DescriptorChain] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Semaphore(0)
        self.threads: set[str] = set()
        self._lock = threading.Lock()
        #: With ``defer``, submit_chain keeps each request here until the test completes it
        #: (:meth:`complete`), in whatever order the test picks.
        self.defer = False
        self.deferred: list[tuple[int, GuestMemory, DescriptorChain, Completion]] = []
        #: Requests whose readable bytes start with this are deferred (and never completed
        #: unless the test does), whatever ``defer`` says.
        self.hold: bytes | None = None

    @property
    def num_queues(self) -> int:
        return self._num_queues

    @property
    def max_queue_size(self) -> int:
        return self._max_queue_size

    def device_features(self) -> int:
        return self.features

    def set_acked_features(self, features: int) -> None:
        self.acked = features

    def read_config(self, offset: int, size: int) -> bytes:
        if offset + size > 4096:
            raise ValueError("config access out of range")
        return bytes(self.config[offset : offset + size]).ljust(size, b"\0")

    def write_config(self, offset: int, data: bytes) -> None:
        if offset + len(data) > len(self.config):
            raise ValueError("config write out of range")
        self.config[offset : offset + len(data)] = data

    def submit_chain(
        self, queue_index: int, memory: GuestMemory, chain: DescriptorChain, complete: Completion
    ) -> None:
        held = False
        if self.hold is not None and chain.fault is None:
            first = next((d for d in chain.descriptors if not d.device_writable), None)
            held = first is not None and memory.read_at(first.gpa, len(self.hold)) == self.hold
        if not self.defer and not held:
            super().submit_chain(queue_index, memory, chain, complete)
            return
        with self._lock:
            self.deferred.append((queue_index, memory, chain, complete))

    def complete(self, head: int) -> None:
        """Serve the deferred request of ``head`` now, on a thread of its own (as an I/O
        thread would), and wait for it."""
        with self._lock:
            (entry,) = [d for d in self.deferred if d[2].head == head]
            self.deferred.remove(entry)
        q, memory, chain, done = entry
        thread = threading.Thread(target=lambda: done(self.handle_chain(q, memory, chain)))
        thread.start()
        thread.join(5)

    def handle_chain(self, queue_index: int, memory: GuestMemory, chain: DescriptorChain) -> int:
        self.entered.release()
        if not self.gate.wait(30):
            raise RuntimeError("echo device: the test never opened the gate")
        with self._lock:
            self.threads.add(threading.current_thread().name)
        if chain.fault is not None:
            with self._lock:
                self.faults.append(chain)
            return 0
        data = b"".join(
            memory.read_at(d.gpa, d.length) for d in chain.descriptors if not d.device_writable
        )
        if data.startswith(BOOM):
            raise RuntimeError("echo device told to explode")
        out = data.upper()
        written = 0
        for d in chain.descriptors:
            if d.device_writable and written < len(out):
                piece = out[written : written + d.length]
                memory.write_at(d.gpa, piece)
                written += len(piece)
        with self._lock:
            self.handled += 1
        return written

    inflight_state_size = 0

    def attach_inflight_state(self, region: memoryview | None) -> None:
        pass

    def release(self) -> None:
        pass

    def acquire(self) -> None:
        pass

    def quiesce(self) -> None:
        with self._lock:
            self.quiesced += 1
