"""The virtqueue interface the connection and queue workers program against.

:class:`vhost_user.ring.split.SplitVirtqueue` (pure Python) implements it; a C twin will too.
Whoever creates rings takes a :data:`VirtqueueFactory`, so the implementation is chosen in one
place (the server's configuration) and nothing else names a concrete class.
"""

from __future__ import annotations

from typing import Protocol

from memory import GuestMemory
from vhost_user.ring.chain import DescriptorChain
from vhost_user.ring.inflight import QueueInflight


class Virtqueue(Protocol):
    """The device side of one virtqueue. Not thread-safe: one queue worker owns it."""

    @property
    def size(self) -> int: ...
    @property
    def next_avail_idx(self) -> int: ...
    @property
    def used_idx(self) -> int: ...
    @property
    def in_flight(self) -> int: ...
    def pop(self) -> DescriptorChain | None: ...
    def push_used(self, head: int, length: int) -> None: ...
    def should_notify(self) -> bool: ...
    def enable_notifications(self) -> bool: ...
    def disable_notifications(self) -> None: ...


class VirtqueueFactory(Protocol):
    """Makes the virtqueue of a started ring (SplitVirtqueue's constructor has this shape)."""

    def __call__(
        self,
        memory: GuestMemory,
        size: int,
        desc_gpa: int,
        avail_gpa: int,
        used_gpa: int,
        *,
        event_idx: bool,
        next_avail_idx: int = ...,
        used_idx: int | None = ...,
        inflight: QueueInflight | None = ...,
    ) -> Virtqueue: ...
