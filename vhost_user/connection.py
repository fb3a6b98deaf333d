"""The backend side of one vhost-user connection: a state machine driven by one thread.

:class:`Connection` reads front-end requests (:meth:`Connection.handle_message` handles
exactly one), keeps the negotiated features, the guest memory map and the vring states, and
starts a :class:`~vhost_user.queue_worker.QueueWorker` thread per ring that may run. Anything
the front-end gets wrong is a :class:`~vhost_user.errors.FrontendProtocolError`: the front-end
gets a failure status if it asked for one (REPLY_ACK), then the caller drops the connection.

Ring life cycle (vhost-user spec, "Ring states"): a ring runs once it has a size, addresses, a
kick eventfd and memory, and is enabled. With ``VHOST_USER_F_PROTOCOL_FEATURES`` negotiated
rings start disabled until ``SET_VRING_ENABLE 1``; without it they are enabled from the start.
A new worker looks at the ring once, then on every kick: the spec's "start the ring upon
receiving a kick" keeps a backend off a ring the front-end is still setting up, and the kick fd
is the last piece of that setup; the first look also re-arms notifications a previous worker
may have left suppressed (then the driver would never kick).
``GET_VRING_BASE`` stops the ring: its worker finishes the request in progress, and the reply
carries the index of the next available entry, the exact point to resume from.

fd ownership: a message's fds belong to the connection once received. Handlers *keep* the ones
they store (region fds, kick/call/err eventfds, the backend channel); every other fd of the
message is closed after the handler ran, whether it succeeded or not. Stored fds are closed
when replaced and on :meth:`Connection.close`. Worker threads never close anything.
"""

from __future__ import annotations

import itertools
import socket
import threading
from dataclasses import dataclass

import structlog

from memory import GuestMemory, GuestMemoryError, MemoryRegion
from vhost_user import eventfd
from vhost_user.device import VhostUserDevice
from vhost_user.errors import ConnectionClosed, FrontendProtocolError, GuestFault
from vhost_user.protocol import codec
from vhost_user.protocol.codec import ProtocolFeature as PF
from vhost_user.queue_worker import QueueWorker, WorkerStuck
from vhost_user.ring.features import VIRTIO_RING_F_EVENT_IDX, has
from vhost_user.ring.split import SplitVirtqueue
from vhost_user.ring.virtqueue import VirtqueueFactory
from vhost_user.transport import Transport, close_fds

log = structlog.get_logger(__name__)

OFFERED_PROTOCOL_FEATURES = (
    PF.MQ | PF.REPLY_ACK | PF.BACKEND_REQ | PF.CONFIG | PF.CONFIGURE_MEM_SLOTS
)
MAX_MEM_SLOTS = 32
"""GET_MAX_MEM_SLOTS: regions the front-end may add with ADD_MEM_REG (libvhost-user's value)."""
MAX_SPLIT_RING_INDEX = 0xFFFF
BACKEND_REPLY_TIMEOUT = 5.0

_connection_ids = itertools.count(1)


def _shut_down(transport: Transport) -> None:
    """End any wait on ``transport``'s socket in another thread (before closing it)."""
    try:
        transport.sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def ring_lengths(num: int) -> tuple[int, int, int]:
    """Bytes of a split ring's descriptor table, available ring and used ring for ``num``
    entries, including the event-index words (virtio 1.2, 2.7.2)."""
    return 16 * num, 6 + 2 * num, 6 + 8 * num


@dataclass
class _Ring:
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


class Connection:
    """One front-end, from SET_OWNER to hang-up. Not thread-safe except
    :meth:`notify_config_change`; everything else runs on the connection thread."""

    def __init__(
        self,
        sock: socket.socket,
        device: VhostUserDevice,
        *,
        message_timeout: float | None = 5.0,
        virtqueue_factory: VirtqueueFactory = SplitVirtqueue,
    ) -> None:
        self.id = next(_connection_ids)
        self._virtqueue_factory = virtqueue_factory
        self.log = log.bind(conn=self.id)
        self.device = device
        self.transport = Transport(sock, message_timeout=message_timeout)
        self.acked_features = 0
        self.protocol_features = 0
        self.owner = False
        self.memory: GuestMemory | None = None
        self.regions: list[MemoryRegion] = []
        self.rings = [_Ring(i) for i in range(device.num_queues)]
        self._kept: set[int] = set()
        self._backend: Transport | None = None
        self._backend_lock = threading.Lock()
        self._notify_lock = threading.Lock()  # one config-change round trip at a time
        self._closed = False
        self._ran_since_quiesce = False

    def fileno(self) -> int:
        return self.transport.fileno()

    # -- driving -------------------------------------------------------------------------------

    def run(self) -> FrontendProtocolError | None:
        """Serve until the front-end hangs up (None) or breaks the protocol (the error), then
        :meth:`close`. Never raises for anything the front-end does."""
        try:
            while True:
                self.handle_message()
        except ConnectionClosed:
            self.log.info("front-end disconnected")
            return None
        except FrontendProtocolError as exc:
            self.log.warning("front-end protocol error: dropping connection", error=str(exc))
            return exc
        finally:
            self.close()

    def handle_message(self) -> None:
        """Receive and handle one request; raises ConnectionClosed or FrontendProtocolError."""
        header, payload, fds = self.transport.receive_raw()
        try:
            msg = codec.parse_request(header, payload, fds)
        except FrontendProtocolError:
            close_fds(fds)
            # The header is sound, so the front-end can still be told this request failed.
            if not header.is_reply:
                self._reply_failure(header.request, header.need_reply)
            raise
        code = codec.request_code(msg)
        self.log.debug("request", message=type(msg).__name__, need_reply=msg.need_reply)
        self._kept = set()
        try:
            reply = self._dispatch(msg)
        except FrontendProtocolError:
            self._reply_failure(code, msg.need_reply)
            raise
        except (GuestMemoryError, ValueError, OSError) as exc:
            self._reply_failure(code, msg.need_reply)
            raise FrontendProtocolError(f"{type(msg).__name__}: {exc}") from exc
        finally:
            close_fds([fd for fd in msg.fds if fd not in self._kept])
        if reply is not None:
            self.transport.send_reply(reply)
        elif self._ack_wanted(code, msg.need_reply):
            self.transport.send_reply(codec.U64Reply(code, 0))

    def _ack_wanted(self, request: int, need_reply: bool) -> bool:
        return (
            need_reply
            and bool(self.protocol_features & PF.REPLY_ACK)
            and request not in codec.NATURAL_REPLIES
        )

    def _reply_failure(self, request: int, need_reply: bool) -> None:
        try:
            if request == codec.Request.GET_CONFIG:
                # Spec, GET_CONFIG: "uses zero length of payload to indicate an error".
                self.transport.send_reply(codec.ConfigReply(0, b""))
            elif self._ack_wanted(request, need_reply):
                self.transport.send_reply(codec.U64Reply(request, 1))
        except (ConnectionClosed, FrontendProtocolError, OSError):
            pass

    def _keep(self, fd: int) -> int:
        self._kept.add(fd)
        return fd

    def _ring(self, index: int) -> _Ring:
        if not 0 <= index < len(self.rings):
            raise FrontendProtocolError(
                f"vring index {index} out of range (device has {len(self.rings)} queues)"
            )
        return self.rings[index]

    def _dispatch(self, msg: codec.Message) -> codec.Reply | None:
        match msg:
            case codec.GetFeatures():
                features = self.device.device_features() | codec.VHOST_USER_F_PROTOCOL_FEATURES
                return codec.U64Reply(codec.Request.GET_FEATURES, features)
            case codec.SetFeatures(features=features):
                self._set_features(features)
            case codec.GetProtocolFeatures():
                return codec.U64Reply(
                    codec.Request.GET_PROTOCOL_FEATURES, int(OFFERED_PROTOCOL_FEATURES)
                )
            case codec.SetProtocolFeatures(features=features):
                if features & ~OFFERED_PROTOCOL_FEATURES:
                    raise FrontendProtocolError(
                        f"protocol features {features:#x} include ones never offered "
                        f"({int(OFFERED_PROTOCOL_FEATURES):#x})"
                    )
                self.protocol_features = features
                self.log.info("protocol features acked", protocol_features=hex(features))
            case codec.SetOwner():
                self.owner = True
            case codec.ResetOwner():
                # Deprecated; the spec recommends treating it as "disable all rings".
                for ring in self.rings:
                    self._pause(ring)
                    ring.enabled = False
            case codec.SetMemTable(regions=regions, region_fds=fds):
                self._set_mem_table(regions, fds)
            case codec.GetMaxMemSlots():
                return codec.U64Reply(codec.Request.GET_MAX_MEM_SLOTS, MAX_MEM_SLOTS)
            case codec.AddMemReg(region=region, fd=fd):
                self._add_mem_reg(region, fd)
            case codec.RemMemReg(region=region):
                self._rem_mem_reg(region)
            case codec.SetVringNum(index=index, num=num):
                self._set_vring_num(self._ring(index), num)
            case codec.SetVringAddr():
                self._set_vring_addr(self._ring(msg.index), msg)
            case codec.SetVringBase(index=index, num=num):
                ring = self._ring(index)
                if num > MAX_SPLIT_RING_INDEX:
                    raise FrontendProtocolError(f"SET_VRING_BASE: {num} is not a 16-bit index")
                self._reconfigure(ring, next_avail=num, used_idx=None)
            case codec.GetVringBase(index=index):
                return self._get_vring_base(self._ring(index))
            case codec.SetVringKick(index=index, fd=fd):
                self._set_vring_kick(self._ring(index), fd)
            case codec.SetVringCall(index=index, fd=fd):
                self._set_vring_call(self._ring(index), fd)
            case codec.SetVringErr(index=index, fd=fd):
                ring = self._ring(index)
                if fd is not None:
                    eventfd.check(fd, "SET_VRING_ERR")
                old, ring.err_fd = ring.err_fd, None if fd is None else self._keep(fd)
                close_fds([] if old is None else [old])
            case codec.SetVringEnable(index=index, enable=enable):
                ring = self._ring(index)
                ring.enabled = enable
                if self._ring_enabled(ring):
                    self._maybe_start(ring)
                else:
                    self._pause(ring)
            case codec.GetQueueNum():
                return codec.U64Reply(codec.Request.GET_QUEUE_NUM, len(self.rings))
            case codec.GetConfig(offset=offset, size=size, flags=flags):
                data = self.device.read_config(offset, size)
                if len(data) != size:
                    raise FrontendProtocolError(
                        f"GET_CONFIG: device returned {len(data)} bytes for {size}"
                    )
                return codec.ConfigReply(offset, data, flags)
            case codec.SetConfig(offset=offset, data=data):
                self.device.write_config(offset, data)
            case codec.SetBackendReqFd(fd=fd):
                self._set_backend_req_fd(fd)
            case _:
                raise FrontendProtocolError(
                    f"unsupported request {codec.request_code(msg)} ({type(msg).__name__})"
                )
        return None

    # -- features ------------------------------------------------------------------------------

    def _set_features(self, features: int) -> None:
        offered = self.device.device_features() | codec.VHOST_USER_F_PROTOCOL_FEATURES
        if features & ~offered:
            raise FrontendProtocolError(
                f"features {features:#x} include ones never offered ({offered:#x})"
            )
        self.acked_features = features
        self.device.set_acked_features(features & ~codec.VHOST_USER_F_PROTOCOL_FEATURES)
        self.log.info("features acked", features=hex(features))

    @property
    def _event_idx(self) -> bool:
        return has(self.acked_features, VIRTIO_RING_F_EVENT_IDX)

    def _ring_enabled(self, ring: _Ring) -> bool:
        if self.acked_features & codec.VHOST_USER_F_PROTOCOL_FEATURES:
            return ring.enabled
        return True

    def _set_backend_req_fd(self, fd: int) -> None:
        if not self.protocol_features & PF.BACKEND_REQ:
            raise FrontendProtocolError("SET_BACKEND_REQ_FD without BACKEND_REQ negotiated")
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise FrontendProtocolError(f"SET_BACKEND_REQ_FD: not a socket ({exc})") from None
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            sock.detach()
            raise FrontendProtocolError("SET_BACKEND_REQ_FD: not a Unix stream socket")
        self._keep(fd)
        with self._backend_lock:
            sock.settimeout(BACKEND_REPLY_TIMEOUT)
            old, self._backend = (
                self._backend,
                Transport(sock, message_timeout=BACKEND_REPLY_TIMEOUT),
            )
        if old is not None:
            _shut_down(old)
            old.close()

    def notify_config_change(self) -> bool:
        """Tell the front-end the config space changed (CONFIG_CHANGE_MSG on the backend
        channel), e.g. after a live resize. Safe from any thread. Returns whether the front-end
        took it (False when the channel or the CONFIG feature is missing, or it failed)."""
        # The round trip runs outside _backend_lock, which the connection thread takes to
        # swap or close the channel: that must not wait for an answer that may never come (a
        # front-end sharing the socket's file description can even steal the answer). A swap
        # or close shuts the old socket down, which ends a wait here at once.
        with self._backend_lock:
            backend = self._backend
            if backend is None or not self.protocol_features & PF.CONFIG:
                return False
            need_reply = bool(self.protocol_features & PF.REPLY_ACK)
        with self._notify_lock:
            try:
                backend.send(codec.ConfigChangeMsg(need_reply=need_reply))
                if not need_reply:
                    return True
                reply = backend.receive_reply(codec.BackendRequest.CONFIG_CHANGE_MSG)
            except (ConnectionClosed, FrontendProtocolError, OSError) as exc:
                # TimeoutError (an OSError) included: the front-end did not answer in time.
                self.log.warning("config change notification failed", error=str(exc))
                return False
            return isinstance(reply, codec.U64Reply) and reply.value == 0

    # -- memory --------------------------------------------------------------------------------

    def _replace_memory(self, regions: list[MemoryRegion]) -> None:
        """Map ``regions`` (validated first: on error nothing changes), then pause the running
        rings, swap, re-translate and resume them. The old mapping is unmapped only once no
        worker can touch it; fds of regions that are gone are closed, those of the new table
        are kept."""
        try:
            new = GuestMemory.from_regions(regions) if regions else None
        except GuestMemoryError as exc:
            raise FrontendProtocolError(f"memory table rejected: {exc}") from None
        paused = [ring for ring in self.rings if ring.worker is not None]
        for ring in paused:
            self._pause(ring)
        old, self.memory = self.memory, new
        kept = {r.fd for r in regions}
        gone = [r.fd for r in self.regions if r.fd not in kept]
        self.regions = regions
        self._kept |= kept
        if old is not None:
            old.close()
        close_fds(gone)
        self.log.info(
            "memory table set",
            regions=len(regions),
            size=sum(r.memory_size for r in regions),
        )
        for ring in self.rings:
            self._maybe_start(ring)

    def _set_mem_table(self, regions: tuple[codec.MemRegion, ...], fds: tuple[int, ...]) -> None:
        self._replace_memory(
            [
                MemoryRegion(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset, fd)
                for r, fd in zip(regions, fds, strict=True)
            ]
        )

    def _add_mem_reg(self, region: codec.MemRegion, fd: int) -> None:
        if len(self.regions) >= MAX_MEM_SLOTS:
            raise FrontendProtocolError(f"ADD_MEM_REG: all {MAX_MEM_SLOTS} memory slots in use")
        new = MemoryRegion(
            region.guest_phys_addr,
            region.memory_size,
            region.userspace_addr,
            region.mmap_offset,
            fd,
        )
        self._replace_memory([*self.regions, new])

    def _rem_mem_reg(self, region: codec.MemRegion) -> None:
        # Spec: identified by guest address, user address and size; the mmap offset is ignored.
        for i, r in enumerate(self.regions):
            if (r.guest_phys_addr, r.userspace_addr, r.memory_size) == (
                region.guest_phys_addr,
                region.userspace_addr,
                region.memory_size,
            ):
                self._replace_memory(self.regions[:i] + self.regions[i + 1 :])
                return
        raise FrontendProtocolError(
            f"REM_MEM_REG: no region at guest address {region.guest_phys_addr:#x} "
            f"with size {region.memory_size:#x}"
        )

    # -- rings ---------------------------------------------------------------------------------

    def _translate(self, ring: _Ring) -> tuple[int, int, int]:
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
        return gpas[0], gpas[1], gpas[2]

    def _maybe_start(self, ring: _Ring) -> None:
        if ring.worker is not None or ring.broken:
            return
        if ring.kick_fd is None or ring.addr is None or ring.num == 0 or self.memory is None:
            return
        if not self._ring_enabled(ring):
            return
        try:
            desc, avail, used = self._translate(ring)
        except FrontendProtocolError as exc:
            # After a memory change the ring may point at memory that is gone for now; it stays
            # stopped until the front-end sets memory or addresses that work.
            self.log.warning("vring cannot start", queue=ring.index, error=str(exc))
            return
        try:
            queue = self._virtqueue_factory(
                self.memory,
                ring.num,
                desc,
                avail,
                used,
                event_idx=self._event_idx,
                next_avail_idx=ring.next_avail,
                used_idx=ring.used_idx,
            )
        except (GuestFault, GuestMemoryError, ValueError) as exc:
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
        self.log.debug("vring started", queue=ring.index, size=ring.num, base=ring.next_avail)

    def _pause(self, ring: _Ring) -> bool:
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

    def _reconfigure(self, ring: _Ring, **changes: object) -> None:
        """Apply front-end changes to a ring (pausing it if it runs), then try to start it."""
        self._pause(ring)
        for name, value in changes.items():
            setattr(ring, name, value)
        ring.broken = False
        self._maybe_start(ring)

    def _set_vring_num(self, ring: _Ring, num: int) -> None:
        limit = self.device.max_queue_size
        if num == 0 or num & (num - 1) or num > limit:
            raise FrontendProtocolError(f"SET_VRING_NUM: {num} is not a power of two in 1..{limit}")
        self._reconfigure(ring, num=num)

    def _set_vring_addr(self, ring: _Ring, addr: codec.SetVringAddr) -> None:
        if addr.flags & ~codec.VRING_F_LOG:
            raise FrontendProtocolError(f"SET_VRING_ADDR: unknown flags {addr.flags:#x}")
        if addr.flags & codec.VRING_F_LOG:
            raise FrontendProtocolError("SET_VRING_ADDR: dirty logging was never offered")
        self._pause(ring)
        previous, ring.addr = ring.addr, addr
        try:
            self._translate(ring)
        except FrontendProtocolError:
            ring.addr = previous
            raise
        self._reconfigure(ring)

    def _get_vring_base(self, ring: _Ring) -> codec.VringStateReply:
        self._pause(ring)
        # Like libvhost-user, forget the eventfds: the ring restarts only with a new kick fd.
        close_fds([fd for fd in (ring.kick_fd, ring.call_fd) if fd is not None])
        ring.kick_fd = ring.call_fd = None
        # QEMU >= 7.2 disables a ring (SET_VRING_ENABLE 0) before GET_VRING_BASE, so the ring
        # may have been paused already: quiesce once the last ring that ran has stopped.
        if self._ran_since_quiesce and all(r.worker is None for r in self.rings):
            self._ran_since_quiesce = False
            self.device.quiesce()
        self.log.debug("vring stopped", queue=ring.index, next_avail=ring.next_avail)
        return codec.VringStateReply(ring.index, ring.next_avail)

    def _set_vring_kick(self, ring: _Ring, fd: int | None) -> None:
        if fd is None:
            raise FrontendProtocolError("SET_VRING_KICK: polling mode (no fd) is not supported")
        eventfd.check(fd, "SET_VRING_KICK")
        self._pause(ring)
        old, ring.kick_fd = ring.kick_fd, self._keep(fd)
        close_fds([] if old is None else [old])
        self._reconfigure(ring)

    def _set_vring_call(self, ring: _Ring, fd: int | None) -> None:
        if fd is not None:
            eventfd.check(fd, "SET_VRING_CALL")
        new = None if fd is None else self._keep(fd)
        old = ring.call_fd
        ring.call_fd = new
        if ring.worker is not None:
            try:
                ring.worker.set_call_fd(new)
            except WorkerStuck as exc:
                self.log.warning("replacing a blocked queue worker", error=str(exc))
                self._pause(ring)  # abandons it; a fresh one takes the new fd
                self._maybe_start(ring)
            # A completion may have been signalled on the old fd after the front-end stopped
            # listening to it; a spurious interrupt is harmless, a lost one hangs the guest.
            # The worker sends it: a write to the front-end's fd is not for this thread.
            if new is not None and ring.worker is not None:
                ring.worker.request_notify()
        close_fds([] if old is None else [old])

    # -- teardown ------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every ring (in-flight requests finish), quiesce the device, unmap memory and
        close every fd. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for ring in self.rings:
            self._pause(ring)
        try:
            self.device.quiesce()
        except Exception:
            self.log.exception("device quiesce failed")
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        close_fds([r.fd for r in self.regions])
        self.regions = []
        for ring in self.rings:
            close_fds([fd for fd in (ring.kick_fd, ring.call_fd, ring.err_fd) if fd is not None])
            ring.kick_fd = ring.call_fd = ring.err_fd = None
        with self._backend_lock:
            if self._backend is not None:
                _shut_down(self._backend)
                self._backend.close()
                self._backend = None
        self.transport.close()
