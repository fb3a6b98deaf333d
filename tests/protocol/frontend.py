"""A small vhost-user front-end in Python, enough to drive the backend like QEMU does.

:class:`Frontend` speaks the protocol over a real Unix socket (``vhost_user.transport`` and
``vhost_user.protocol.codec`` do the framing, so a bug there shows up as a round-trip failure rather
than hiding in a second implementation). :class:`FrontendMemory` is "guest RAM": memfd regions
at guest addresses with a hole between them, announced with userspace addresses that differ
from the guest addresses, so a backend that confuses the two fails.

Used by ``tests/protocol``; not part of the package.
"""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

from memory import GuestMemory, MemoryRegion
from tests.support.driver_ring import DriverRing
from vhost_user.protocol import codec
from vhost_user.protocol.codec import ProtocolFeature as PF
from vhost_user.transport import Transport

VIRTIO_F_VERSION_1 = 1 << 32
VIRTIO_RING_F_EVENT_IDX = 1 << 29
VIRTIO_RING_F_INDIRECT_DESC = 1 << 28

MiB = 1 << 20


@dataclass(frozen=True)
class RegionSpec:
    guest_phys_addr: int
    size: int
    userspace_addr: int
    mmap_offset: int = 0


DEFAULT_LAYOUT = (
    # 1 MiB at 0, a 1 MiB hole, 2 MiB at 2 MiB (mapped from 64 KiB into its memfd).
    RegionSpec(0, 1 * MiB, 0x7F00_0000_0000),
    RegionSpec(2 * MiB, 2 * MiB, 0x7F10_0004_0000, mmap_offset=64 * 1024),
)


@dataclass
class FrontendMemory:
    """Guest RAM as the front-end owns it: one memfd per region, mapped here too."""

    specs: tuple[RegionSpec, ...] = DEFAULT_LAYOUT
    fds: list[int] = field(default_factory=list)
    guest: GuestMemory | None = None

    def __post_init__(self) -> None:
        regions = []
        for i, spec in enumerate(self.specs):
            fd = os.memfd_create(f"guest-ram-{i}", os.MFD_CLOEXEC)
            os.ftruncate(fd, spec.mmap_offset + spec.size)
            self.fds.append(fd)
            regions.append(
                MemoryRegion(
                    spec.guest_phys_addr, spec.size, spec.userspace_addr, spec.mmap_offset, fd
                )
            )
        self.guest = GuestMemory.from_regions(regions)

    @property
    def mem(self) -> GuestMemory:
        assert self.guest is not None
        return self.guest

    def uva(self, gpa: int) -> int:
        for spec in self.specs:
            if spec.guest_phys_addr <= gpa < spec.guest_phys_addr + spec.size:
                return spec.userspace_addr + gpa - spec.guest_phys_addr
        raise ValueError(f"gpa {gpa:#x} is not in guest RAM")

    def regions(self) -> tuple[codec.MemRegion, ...]:
        return tuple(
            codec.MemRegion(s.guest_phys_addr, s.size, s.userspace_addr, s.mmap_offset)
            for s in self.specs
        )

    def close(self) -> None:
        if self.guest is not None:
            self.guest.close()
            self.guest = None
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


@dataclass
class VringFds:
    kick: int
    call: int

    def close(self) -> None:
        os.close(self.kick)
        os.close(self.call)


class Frontend:
    """Sends requests and checks replies; every method mirrors one vhost-user request."""

    def __init__(self, sock: socket.socket, *, timeout: float = 10.0) -> None:
        sock.settimeout(timeout)
        self.transport = Transport(sock, message_timeout=timeout)
        self.protocol_features = 0
        self.offered_features = 0
        self.backend_channel: socket.socket | None = None
        self.vrings: dict[int, VringFds] = {}

    @classmethod
    def connect(cls, path: str, *, timeout: float = 10.0) -> Frontend:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(path)
        return cls(sock, timeout=timeout)

    # -- plumbing ------------------------------------------------------------------------------

    @property
    def reply_ack(self) -> bool:
        return bool(self.protocol_features & PF.REPLY_ACK)

    def send(self, msg: codec.Message) -> None:
        self.transport.send(msg)

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        self.transport.send_bytes(data, fds)

    def request(self, msg: codec.Message) -> codec.Reply | None:
        """Send ``msg``; wait for its natural reply, or for the ack if ``need_reply``."""
        self.send(msg)
        code = codec.request_code(msg)
        if code in codec.NATURAL_REPLIES or msg.need_reply:
            return self.transport.receive_reply(code)
        return None

    def call(self, msg: codec.Message) -> None:
        """Send with NEED_REPLY (when REPLY_ACK is negotiated) and insist on success."""
        if self.reply_ack:
            import dataclasses

            msg = dataclasses.replace(msg, need_reply=True)
        reply = self.request(msg)
        if reply is not None:
            assert isinstance(reply, codec.U64Reply), reply
            if reply.value != 0:
                raise BackendRefused(f"{type(msg).__name__} failed with status {reply.value}")

    def u64(self, msg: codec.Message) -> int:
        reply = self.request(msg)
        assert isinstance(reply, codec.U64Reply), reply
        return reply.value

    # -- requests ------------------------------------------------------------------------------

    def get_features(self) -> int:
        return self.u64(codec.GetFeatures())

    def get_protocol_features(self) -> int:
        return self.u64(codec.GetProtocolFeatures())

    def set_protocol_features(self, features: int) -> None:
        self.send(codec.SetProtocolFeatures(features))
        self.protocol_features = features

    def get_queue_num(self) -> int:
        return self.u64(codec.GetQueueNum())

    def get_max_mem_slots(self) -> int:
        return self.u64(codec.GetMaxMemSlots())

    def set_backend_req_fd(self) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.call(codec.SetBackendReqFd(theirs.fileno()))
        finally:
            theirs.close()
        self.backend_channel = ours
        return ours

    def get_config(self, offset: int, size: int) -> bytes:
        reply = self.request(codec.GetConfig(offset, size))
        assert isinstance(reply, codec.ConfigReply), reply
        return reply.data

    def set_features(self, features: int) -> None:
        self.call(codec.SetFeatures(features))

    def set_mem_table(self, memory: FrontendMemory) -> None:
        self.call(codec.SetMemTable(memory.regions(), tuple(memory.fds)))

    def add_mem_reg(self, region: codec.MemRegion, fd: int) -> None:
        self.call(codec.AddMemReg(region, fd))

    def rem_mem_reg(self, region: codec.MemRegion) -> None:
        self.call(codec.RemMemReg(region))

    def setup_vring(
        self,
        index: int,
        memory: FrontendMemory,
        *,
        size: int,
        desc: int,
        avail: int,
        used: int,
        base: int = 0,
        enable: bool = True,
        log: bool = False,
    ) -> VringFds:
        """QEMU's vhost_virtqueue_start order: NUM, BASE, ADDR, KICK, CALL, then ENABLE.
        ``desc``/``avail``/``used`` are guest physical; they go out as userspace addresses.
        ``log``: VRING_F_LOG, the used ring logged at its guest address (migration)."""
        self.call(codec.SetVringNum(index, size))
        self.call(codec.SetVringBase(index, base))
        flags, log_addr = (codec.VRING_F_LOG, used) if log else (0, 0)
        self.call(
            codec.SetVringAddr(
                index, flags, memory.uva(desc), memory.uva(used), memory.uva(avail), log_addr
            )
        )
        fds = VringFds(
            kick=os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK),
            call=os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK),
        )
        self.call(codec.SetVringKick(index, fds.kick))
        self.call(codec.SetVringCall(index, fds.call))
        if enable:
            self.set_vring_enable(index, True)
        old = self.vrings.pop(index, None)
        if old is not None:
            old.close()
        self.vrings[index] = fds
        return fds

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self.call(codec.SetVringEnable(index, enable))

    def get_vring_base(self, index: int) -> int:
        reply = self.request(codec.GetVringBase(index))
        assert isinstance(reply, codec.VringStateReply), reply
        assert reply.index == index
        return reply.num

    def kick(self, index: int) -> None:
        os.eventfd_write(self.vrings[index].kick, 1)

    def wait_call(self, index: int, timeout: float = 5.0) -> bool:
        """Wait for the backend to signal queue ``index``; consume the signal."""
        fd = self.vrings[index].call
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            return False
        os.eventfd_read(fd)
        return True

    # -- QEMU 7.2 vhost-user-blk sequences -----------------------------------------------------

    def handshake(self, *, want_protocol: int | None = None) -> int:
        """vhost_user_blk_realize -> vhost_dev_init, then GET_CONFIG. Returns the features to
        ack: what the backend offers less VHOST_F_LOG_ALL, which QEMU acks only while it
        migrates the device (then stopping the rings hands the image over)."""
        self.offered_features = features = self.get_features()
        assert features & codec.VHOST_USER_F_PROTOCOL_FEATURES
        offered = self.get_protocol_features()
        self.set_protocol_features(offered if want_protocol is None else offered & want_protocol)
        if self.protocol_features & PF.MQ:
            self.queue_num = self.get_queue_num()
        if self.protocol_features & PF.CONFIGURE_MEM_SLOTS:
            self.max_mem_slots = self.get_max_mem_slots()
        if self.protocol_features & PF.BACKEND_REQ:
            self.set_backend_req_fd()
        self.call(codec.SetOwner())
        if self.protocol_features & PF.CONFIG:
            self.config = self.get_config(0, 60)
        return features & ~codec.VHOST_F_LOG_ALL

    def close(self) -> None:
        for fds in self.vrings.values():
            fds.close()
        self.vrings.clear()
        if self.backend_channel is not None:
            self.backend_channel.close()
            self.backend_channel = None
        self.transport.close()

    def __enter__(self) -> Frontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BackendRefused(Exception):
    """The backend answered a REPLY_ACK with a failure status."""


# -- a driver's view of one split ring ---------------------------------------------------------

RING_GPA = 2 * MiB + 0x10000
"""Where tests put queue 0's ring (in the second region, away from its start); queue i sits
``i * RING_STRIDE`` further on."""
RING_STRIDE = 0x8000
BUFFERS_GPA = 0x1000
"""Data buffers start here, in the first region."""
INDIRECT_AREA = (0xC0000, 0x10000)
"""Where drivers build indirect descriptor tables (first region, above the buffers)."""


@dataclass(frozen=True)
class RingLayout:
    size: int
    desc: int
    avail: int
    used: int

    @classmethod
    def at(cls, base: int, size: int) -> RingLayout:
        desc = base
        avail = desc + 16 * size
        used = (avail + 6 + 2 * size + 0xFFF) & ~0xFFF
        return cls(size, desc, avail, used)


def ring_layout(index: int, size: int = 64) -> RingLayout:
    return RingLayout.at(RING_GPA + index * RING_STRIDE, size)


class Driver:
    """The guest driver of one queue: ``tests.support.driver_ring.DriverRing`` plus the
    EVENT_IDX habit of asking for the next interrupt after consuming used entries. Buffers are
    (gpa, length, device_writable). ``indirect_area`` lets :meth:`add` build indirect chains."""

    def __init__(
        self,
        mem: GuestMemory,
        layout: RingLayout,
        *,
        event_idx: bool,
        indirect_area: tuple[int, int] | None = INDIRECT_AREA,
    ) -> None:
        self.ring = DriverRing(
            mem, layout.size, layout.desc, layout.avail, layout.used, indirect_area=indirect_area
        )
        self.event_idx = event_idx

    def add(self, bufs: Sequence[tuple[int, int, bool]], indirect: bool = False) -> int:
        return self.ring.add_chain(list(bufs), indirect)

    def has_used(self) -> bool:
        return self.ring.used_idx != self.ring.last_used

    def used(self) -> list[tuple[int, int]]:
        """Used entries published since the last call: (head id, length)."""
        out = self.ring.used_entries()
        if self.event_idx:
            # used_event: interrupt me when you move past what I have seen (virtio 2.7.10).
            self.ring.set_used_event(self.ring.last_used)
        return out


def make_driver(mem: GuestMemory, layout: RingLayout, *, event_idx: bool) -> Driver:
    return Driver(mem, layout, event_idx=event_idx)
