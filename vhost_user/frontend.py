"""A vhost-user front-end, enough to drive any backend with no VM (the benchmark driver).

It does what QEMU does for a vhost-user device, in QEMU's order (hw/virtio/vhost-user.c,
vhost_dev_init then vhost_dev_start): features, protocol features, queue count, SET_OWNER, the
config space; then the acked features, the memory table (one memfd region: the "guest RAM",
mapped here as well), and each vring (NUM, BASE, ADDR, KICK, CALL, ENABLE). The rings
themselves are driven by whoever owns the memory (``blkdev.bench``). Framing goes through
``protocol.codec`` and ``transport``, so the backend sees exactly what it would from QEMU.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import socket
from dataclasses import dataclass

from vhost_user.protocol import codec
from vhost_user.protocol.codec import ProtocolFeature as PF
from vhost_user.transport import Transport

UVA_BASE = 0x7E00_0000_0000
"""Where the front-end says guest RAM lives in its address space. Any value works (the backend
translates userspace addresses through the table); this one is not where anything is mapped
here, so a backend that used it as a pointer would fault at once."""

VIRTIO_F_VERSION_1 = 1 << 32
VIRTIO_RING_F_EVENT_IDX = 1 << 29
VIRTIO_RING_F_INDIRECT_DESC = 1 << 28
DEVICE_FEATURES = (1 << 24) - 1
"""Bits 0..23, the device type's own (virtio-blk: FLUSH, BLK_SIZE, MQ, DISCARD...): a driver
that plays a Linux guest acks every one offered, so the device runs as it would for one (with
FLUSH negotiated, its write cache is on; without, every write is written through)."""


class FrontendError(Exception):
    """The backend refused or misanswered a request."""


@dataclass
class Vring:
    index: int
    size: int
    desc: int
    avail: int
    used: int
    kick: int
    call: int


class Frontend:
    """One connection to a backend, with ``mem_size`` bytes of guest RAM at guest address 0."""

    def __init__(self, path: str, mem_size: int, *, timeout: float = 10.0) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            raise
        self.transport = Transport(sock, message_timeout=timeout)
        self.mem_size = mem_size
        self.mem_fd = os.memfd_create("bench-guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.mem_fd, mem_size)
        self.mem = mmap.mmap(self.mem_fd, mem_size)
        self.protocol_features = 0
        self.features = 0
        self.vrings: dict[int, Vring] = {}

    # -- plumbing ------------------------------------------------------------------------------

    def _request(self, msg: codec.Message) -> codec.Reply | None:
        self.transport.send(msg)
        code = codec.request_code(msg)
        if code in codec.NATURAL_REPLIES or msg.need_reply:
            return self.transport.receive_reply(code)
        return None

    def _call(self, msg: codec.Message) -> None:
        """Send; with REPLY_ACK, insist on success."""
        if self.protocol_features & PF.REPLY_ACK:
            msg = dataclasses.replace(msg, need_reply=True)
        reply = self._request(msg)
        if isinstance(reply, codec.U64Reply) and reply.value != 0:
            raise FrontendError(f"{type(msg).__name__} failed with status {reply.value}")

    def _u64(self, msg: codec.Message) -> int:
        reply = self._request(msg)
        if not isinstance(reply, codec.U64Reply):
            raise FrontendError(f"{type(msg).__name__}: unexpected reply {reply!r}")
        return reply.value

    # -- the sequence --------------------------------------------------------------------------

    def start(self, want_features: int) -> bytes:
        """Negotiate and set up the memory table; returns the config space (60 bytes)."""
        offered = self._u64(codec.GetFeatures())
        if not offered & codec.VHOST_USER_F_PROTOCOL_FEATURES:
            raise FrontendError("the backend does not offer VHOST_USER_F_PROTOCOL_FEATURES")
        protocol = self._u64(codec.GetProtocolFeatures())
        self.protocol_features = protocol & (PF.MQ | PF.REPLY_ACK | PF.CONFIG)
        self.transport.send(codec.SetProtocolFeatures(self.protocol_features))
        self.queue_num = self._u64(codec.GetQueueNum()) if protocol & PF.MQ else 1
        self._call(codec.SetOwner())
        config = b""
        if self.protocol_features & PF.CONFIG:
            reply = self._request(codec.GetConfig(0, 60))
            if not isinstance(reply, codec.ConfigReply):
                raise FrontendError(f"GET_CONFIG: unexpected reply {reply!r}")
            config = reply.data
        self.features = (offered & want_features) | codec.VHOST_USER_F_PROTOCOL_FEATURES
        self._call(codec.SetFeatures(self.features))
        region = codec.MemRegion(0, self.mem_size, UVA_BASE, 0)
        self._call(codec.SetMemTable((region,), (self.mem_fd,)))
        return config

    def setup_vring(self, index: int, size: int, desc: int, avail: int, used: int) -> Vring:
        """Start vring ``index`` on rings at guest addresses ``desc``/``avail``/``used``."""
        self._call(codec.SetVringNum(index, size))
        self._call(codec.SetVringBase(index, 0))
        self._call(
            codec.SetVringAddr(index, 0, UVA_BASE + desc, UVA_BASE + used, UVA_BASE + avail, 0)
        )
        kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        ring = Vring(index, size, desc, avail, used, kick, call)
        self.vrings[index] = ring
        self._call(codec.SetVringKick(index, kick))
        self._call(codec.SetVringCall(index, call))
        self._call(codec.SetVringEnable(index, True))
        return ring

    def stop_vring(self, index: int) -> int:
        """GET_VRING_BASE: the backend stops the ring; returns its next avail index."""
        reply = self._request(codec.GetVringBase(index))
        if not isinstance(reply, codec.VringStateReply):
            raise FrontendError(f"GET_VRING_BASE: unexpected reply {reply!r}")
        return reply.num

    def close(self) -> None:
        for ring in self.vrings.values():
            os.close(ring.kick)
            os.close(ring.call)
        self.vrings.clear()
        self.transport.close()
        self.mem.close()
        os.close(self.mem_fd)

    def __enter__(self) -> Frontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
