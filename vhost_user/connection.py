"""The backend side of one vhost-user connection: a state machine driven by one thread.

:class:`Connection` reads front-end requests (:meth:`Connection.handle_message` handles
exactly one) and hands each to its handler through one table, message class to bound method,
one handler per message (the shape of rust-vmm's ``VhostUserBackendReqHandler``). It keeps the
negotiated features and the memory table itself; the vrings and their queue workers are
``vhost_user.vring``'s, the back-end channel ``vhost_user.backend_channel``'s.

Blame: anything the front-end gets wrong is a :class:`~vhost_user.errors.FrontendProtocolError`:
the front-end gets a failure status if it asked for one (REPLY_ACK), then the caller drops the
connection. Handlers check what the front-end sent before acting on it; a ``ValueError`` or
``TypeError`` out of a handler is a bug of ours, never blamed on the front-end: it gets the
same failure status, and the exception propagates (the server logs it and drops the
connection).

fd ownership: a message's fds belong to the connection once received. Handlers *keep* the ones
they store (region fds, kick/call/err eventfds, the backend channel); every other fd of the
message is closed after the handler ran, whether it succeeded or not. Stored fds are closed
when replaced and on :meth:`Connection.close`. Worker threads never close anything.
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Callable
from typing import TypeVar, cast

import structlog

from memory import GuestMemory, GuestMemoryError, MemoryRegion
from memory.dirty_log import DirtyLog
from vhost_user import eventfd
from vhost_user.backend_channel import BackendChannel
from vhost_user.device import VhostUserDevice
from vhost_user.errors import ConnectionClosed, FrontendProtocolError
from vhost_user.protocol import codec
from vhost_user.protocol.codec import ProtocolFeature as PF
from vhost_user.ring.inflight import InflightArea, InflightError
from vhost_user.ring.split import SplitVirtqueue
from vhost_user.ring.virtqueue import VirtqueueFactory
from vhost_user.transport import Transport, close_fds
from vhost_user.vring import Vring, Vrings, ring_lengths

__all__ = ["MAX_MEM_SLOTS", "OFFERED_PROTOCOL_FEATURES", "Connection", "ring_lengths"]

log = structlog.get_logger(__name__)

OFFERED_PROTOCOL_FEATURES = (
    PF.MQ
    | PF.LOG_SHMFD
    | PF.REPLY_ACK
    | PF.BACKEND_REQ
    | PF.CONFIG
    | PF.INFLIGHT_SHMFD
    | PF.CONFIGURE_MEM_SLOTS
)
TRANSPORT_FEATURES = codec.VHOST_USER_F_PROTOCOL_FEATURES | codec.VHOST_F_LOG_ALL
"""Feature bits the connection offers beside the device's: they are vhost-user's, not the
device's, so the device never sees them acked."""
MAX_MEM_SLOTS = 32
"""GET_MAX_MEM_SLOTS: regions the front-end may add with ADD_MEM_REG (libvhost-user's value)."""
CONFIG_SPACE_LIMIT = 4096
"""The config space a device answers for (``VhostUserDevice.read_config``); GET_CONFIG and
SET_CONFIG past it are the front-end's error."""

_connection_ids = itertools.count(1)

_M = TypeVar("_M", bound=codec.Message)
_Handler = Callable[[codec.Message], codec.Reply | None]


def _on(
    kind: type[_M], handler: Callable[[_M], codec.Reply | None]
) -> tuple[type[codec.Message], _Handler]:
    """One entry of the dispatch table (mypy checks that ``handler`` takes a ``kind``)."""
    return kind, cast(_Handler, handler)


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
        self.log = log.bind(conn=self.id)
        self.device = device
        self.transport = Transport(sock, message_timeout=message_timeout)
        self.acked_features = 0
        self.protocol_features = 0
        self.owner = False
        self.memory: GuestMemory | None = None
        self.regions: list[MemoryRegion] = []
        self.vrings = Vrings(device, virtqueue_factory, self.log)
        self._backend = BackendChannel(self.log)
        #: The dirty log (SET_LOG_BASE), and the memory whose writes currently mark it.
        self._dirty_log: DirtyLog | None = None
        self._logging: GuestMemory | None = None
        self._log_fd: int | None = None
        self._kept: set[int] = set()
        self._closed = False
        self._handlers: dict[type[codec.Message], _Handler] = dict(
            [
                _on(codec.GetFeatures, self._get_features),
                _on(codec.SetFeatures, self._set_features),
                _on(codec.GetProtocolFeatures, self._get_protocol_features),
                _on(codec.SetProtocolFeatures, self._set_protocol_features),
                _on(codec.SetOwner, self._set_owner),
                _on(codec.ResetOwner, self._reset_owner),
                _on(codec.SetMemTable, self._set_mem_table),
                _on(codec.SetLogBase, self._set_log_base),
                _on(codec.SetLogFd, self._set_log_fd),
                _on(codec.GetInflightFd, self._get_inflight_fd),
                _on(codec.SetInflightFd, self._set_inflight_fd),
                _on(codec.GetMaxMemSlots, self._get_max_mem_slots),
                _on(codec.AddMemReg, self._add_mem_reg),
                _on(codec.RemMemReg, self._rem_mem_reg),
                _on(codec.SetVringNum, self._set_vring_num),
                _on(codec.SetVringAddr, self._set_vring_addr),
                _on(codec.SetVringBase, self._set_vring_base),
                _on(codec.GetVringBase, self._get_vring_base),
                _on(codec.SetVringKick, self._set_vring_kick),
                _on(codec.SetVringCall, self._set_vring_call),
                _on(codec.SetVringErr, self._set_vring_err),
                _on(codec.SetVringEnable, self._set_vring_enable),
                _on(codec.GetQueueNum, self._get_queue_num),
                _on(codec.GetConfig, self._get_config),
                _on(codec.SetConfig, self._set_config),
                _on(codec.SetBackendReqFd, self._set_backend_req_fd),
            ]
        )

    @property
    def rings(self) -> list[Vring]:
        """The vrings, one per queue of the device."""
        return self.vrings.rings

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
        """Receive and handle one request; raises ConnectionClosed or FrontendProtocolError
        (anything else is a bug of ours)."""
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
        handler = self._handlers.get(type(msg), self._unsupported)
        self._kept = set()
        try:
            reply = handler(msg)
        except (GuestMemoryError, OSError) as exc:
            self._reply_failure(code, msg.need_reply)
            raise FrontendProtocolError(f"{type(msg).__name__}: {exc}") from exc
        except Exception:
            # The front-end's error, or a bug of ours (which propagates as it is): either way
            # the front-end hears that this request failed before the connection is dropped.
            self._reply_failure(code, msg.need_reply)
            raise
        finally:
            close_fds([fd for fd in msg.fds if fd not in self._kept])
        if reply is not None:
            try:
                self.transport.send_reply(reply)
            finally:
                if isinstance(reply, codec.InflightReply):
                    close_fds([reply.fd])  # a copy went with the reply; ours is not kept
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

    def _eventfd(self, fd: int | None, what: str) -> int | None:
        """``fd`` checked (a plain eventfd) and kept, or None (the spec's invalid-FD flag)."""
        return None if fd is None else self._keep(eventfd.check(fd, what))

    def _unsupported(self, msg: codec.Message) -> None:
        raise FrontendProtocolError(
            f"unsupported request {codec.request_code(msg)} ({type(msg).__name__})"
        )

    # -- features and ownership ----------------------------------------------------------------

    def _offered_features(self) -> int:
        return self.device.device_features() | TRANSPORT_FEATURES

    def _get_features(self, msg: codec.GetFeatures) -> codec.U64Reply:
        return codec.U64Reply(codec.Request.GET_FEATURES, self._offered_features())

    def _set_features(self, msg: codec.SetFeatures) -> None:
        offered = self._offered_features()
        if msg.features & ~offered:
            raise FrontendProtocolError(
                f"features {msg.features:#x} include ones never offered ({offered:#x})"
            )
        self.acked_features = msg.features
        self.device.set_acked_features(msg.features & ~TRANSPORT_FEATURES)
        self.vrings.set_features(msg.features)
        self.vrings.migrating = bool(msg.features & codec.VHOST_F_LOG_ALL)
        self.log.info("features acked", features=hex(msg.features))
        # QEMU turns LOG_ALL on when a migration starts and off when it ends or fails; it
        # waits for this message to be handled (a REPLY_ACK or a GET_FEATURES round trip)
        # before it reads the log, so the hook is in place before it looks.
        self._update_logging()

    def _get_protocol_features(self, msg: codec.GetProtocolFeatures) -> codec.U64Reply:
        return codec.U64Reply(codec.Request.GET_PROTOCOL_FEATURES, int(OFFERED_PROTOCOL_FEATURES))

    def _set_protocol_features(self, msg: codec.SetProtocolFeatures) -> None:
        if msg.features & ~OFFERED_PROTOCOL_FEATURES:
            raise FrontendProtocolError(
                f"protocol features {msg.features:#x} include ones never offered "
                f"({int(OFFERED_PROTOCOL_FEATURES):#x})"
            )
        self.protocol_features = msg.features
        self.log.info("protocol features acked", protocol_features=hex(msg.features))

    def _set_owner(self, msg: codec.SetOwner) -> None:
        self.owner = True

    def _reset_owner(self, msg: codec.ResetOwner) -> None:
        self.vrings.disable_all()

    def _get_queue_num(self, msg: codec.GetQueueNum) -> codec.U64Reply:
        return codec.U64Reply(codec.Request.GET_QUEUE_NUM, len(self.rings))

    # -- config space and the back-end channel -------------------------------------------------

    def _check_config_access(self, msg: codec.Message, offset: int, size: int) -> None:
        # The codec bounds the size (VHOST_USER_MAX_CONFIG_SIZE), not the offset: checked here,
        # so that the device never sees an access its contract lets it refuse with ValueError.
        if offset + size > CONFIG_SPACE_LIMIT:
            raise FrontendProtocolError(
                f"{type(msg).__name__}: {offset}+{size} is outside the "
                f"{CONFIG_SPACE_LIMIT}-byte config space"
            )

    def _get_config(self, msg: codec.GetConfig) -> codec.ConfigReply:
        self._check_config_access(msg, msg.offset, msg.size)
        data = self.device.read_config(msg.offset, msg.size)
        if len(data) != msg.size:
            raise ValueError(f"GET_CONFIG: device returned {len(data)} bytes for {msg.size}")
        return codec.ConfigReply(msg.offset, data, msg.flags)

    def _set_config(self, msg: codec.SetConfig) -> None:
        self._check_config_access(msg, msg.offset, len(msg.data))
        try:
            self.device.write_config(msg.offset, msg.data)
        except ValueError as exc:
            # VhostUserDevice.write_config refuses an offset outside the device's own layout
            # with ValueError, and the offset is the front-end's: the one ValueError that is.
            raise FrontendProtocolError(f"{type(msg).__name__}: {exc}") from None

    def _set_backend_req_fd(self, msg: codec.SetBackendReqFd) -> None:
        self._backend.attach(msg.fd, self.protocol_features)
        self._keep(msg.fd)

    def notify_config_change(self) -> bool:
        """Tell the front-end the config space changed (CONFIG_CHANGE_MSG on the backend
        channel), e.g. after a live resize. Safe from any thread. Returns whether the front-end
        took it (False when the channel or the CONFIG feature is missing, or it failed)."""
        return self._backend.notify_config_change(self.protocol_features)

    # -- inflight tracking (restart without losing a request) ----------------------------------

    def _get_inflight_fd(self, msg: codec.GetInflightFd) -> codec.InflightReply:
        """A fresh area for ``num_queues`` queues of ``queue_size``; QEMU keeps the fd and
        gives it back with SET_INFLIGHT_FD, to us and to whichever backend follows us."""
        if not self.protocol_features & PF.INFLIGHT_SHMFD:
            raise FrontendProtocolError("GET_INFLIGHT_FD without INFLIGHT_SHMFD negotiated")
        if msg.num_queues > len(self.rings) or not 1 <= msg.queue_size <= 32768:
            raise FrontendProtocolError(
                f"GET_INFLIGHT_FD: {msg.num_queues} queues of {msg.queue_size} entries "
                f"(the device has {len(self.rings)} queues)"
            )
        try:
            area, fd = InflightArea.create(
                max(msg.num_queues, 1),
                msg.queue_size,
                state_size=self.device.inflight_state_size,
            )
        except InflightError as exc:
            raise FrontendProtocolError(f"GET_INFLIGHT_FD: {exc}") from None
        area.close()  # SET_INFLIGHT_FD maps it, from the fd QEMU sends back
        # The reply carries the fd (handle_message closes our copy once it is sent).
        return codec.InflightReply(area.mmap_size, 0, msg.num_queues, msg.queue_size, fd)

    def _set_inflight_fd(self, msg: codec.SetInflightFd) -> None:
        if not self.protocol_features & PF.INFLIGHT_SHMFD:
            raise FrontendProtocolError("SET_INFLIGHT_FD without INFLIGHT_SHMFD negotiated")
        if msg.num_queues > len(self.rings):
            raise FrontendProtocolError(
                f"SET_INFLIGHT_FD: {msg.num_queues} queues, the device has {len(self.rings)}"
            )
        try:
            area = InflightArea(
                msg.fd,
                msg.mmap_size,
                msg.mmap_offset,
                msg.num_queues,
                msg.queue_size,
                state_size=self.device.inflight_state_size,
            )
        except InflightError as exc:
            raise FrontendProtocolError(f"SET_INFLIGHT_FD: {exc}") from None
        # Rings stop before the area changes: a worker records into the area it started with.
        self.vrings.pause_all()
        old, self.vrings.inflight = self.vrings.inflight, area
        if self.device.inflight_state_size and area.state is None:
            self.log.warning(
                "the inflight area has no room for the device's state (made by another "
                "backend?): completed, unflushed qcow2 metadata would not survive a restart",
                mmap_size=msg.mmap_size,
            )
        # Before the old area goes: the device detaches from it (the qcow2 journal writes back).
        self._attach_state(area.state)
        if old is not None:
            old.close()
        self.log.info("inflight area set", queues=msg.num_queues, queue_size=msg.queue_size)
        self.vrings.set_memory(self.memory)

    def _attach_state(self, region: memoryview | None) -> None:
        try:
            self.device.attach_inflight_state(region)
        except Exception:
            self.log.exception("the device failed to take its inflight state")

    # -- dirty logging (live migration) --------------------------------------------------------

    def _set_log_base(self, msg: codec.SetLogBase) -> codec.LogBaseReply:
        if not self.protocol_features & PF.LOG_SHMFD:
            raise FrontendProtocolError("SET_LOG_BASE without LOG_SHMFD negotiated")
        try:
            new = DirtyLog(msg.fd, msg.mmap_size, msg.mmap_offset)
        except GuestMemoryError as exc:
            raise FrontendProtocolError(f"SET_LOG_BASE: {exc}") from None
        # The fd is not kept: the mapping holds the memory (closed after this handler).
        old, self._dirty_log = self._dirty_log, new
        self._stop_logging()
        if old is not None:
            old.close()
        self.log.info("dirty log set", size=msg.mmap_size, pages=new.pages)
        self._update_logging()
        return codec.LogBaseReply()

    def _set_log_fd(self, msg: codec.SetLogFd) -> None:
        fd = self._keep(eventfd.check(msg.fd, "SET_LOG_FD"))
        old, self._log_fd = self._log_fd, fd
        if old is not None:
            self._kept.discard(old)
            close_fds([old])

    def _stop_logging(self) -> None:
        if self._logging is not None:
            self._logging.writes.remove()
            self._logging = None

    def _update_logging(self) -> None:
        """Mark the dirty log from every write into the current memory exactly while
        LOG_ALL is acked and a log is mapped (memory.dirty_log)."""
        log = self._dirty_log
        want = (
            self.memory if log is not None and self.acked_features & codec.VHOST_F_LOG_ALL else None
        )
        if want is self._logging:
            return
        self._stop_logging()
        if want is not None and log is not None:
            # Rings pause while logging starts: a write in progress (on an I/O thread, or in
            # a native data plane that does not log) finishes before it, and every write after
            # it goes through the write choke point (memory.write_tracker).
            self.vrings.pause_all()
            want.writes.install(log.mark)
            self._logging = want
            self.log.info("dirty logging on")
            self.vrings.set_memory(self.memory)
        else:
            self.log.info("dirty logging off")

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
        self.vrings.pause_all()
        old, self.memory = self.memory, new
        kept = {r.fd for r in regions}
        gone = [r.fd for r in self.regions if r.fd not in kept]
        self.regions = regions
        self._kept |= kept
        if old is not None:
            if self._logging is old:
                self._stop_logging()
            old.close()
        close_fds(gone)
        self.log.info(
            "memory table set",
            regions=len(regions),
            size=sum(r.memory_size for r in regions),
        )
        # Before the rings restart on the new memory: their writes must be logged from the
        # first one.
        self._update_logging()
        self.vrings.set_memory(new)

    def _set_mem_table(self, msg: codec.SetMemTable) -> None:
        self._replace_memory(
            [
                MemoryRegion(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset, fd)
                for r, fd in zip(msg.regions, msg.region_fds, strict=True)
            ]
        )

    def _get_max_mem_slots(self, msg: codec.GetMaxMemSlots) -> codec.U64Reply:
        return codec.U64Reply(codec.Request.GET_MAX_MEM_SLOTS, MAX_MEM_SLOTS)

    def _add_mem_reg(self, msg: codec.AddMemReg) -> None:
        if len(self.regions) >= MAX_MEM_SLOTS:
            raise FrontendProtocolError(f"ADD_MEM_REG: all {MAX_MEM_SLOTS} memory slots in use")
        r = msg.region
        new = MemoryRegion(
            r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset, msg.fd
        )
        self._replace_memory([*self.regions, new])

    def _rem_mem_reg(self, msg: codec.RemMemReg) -> None:
        # Spec: identified by guest address, user address and size; the mmap offset is ignored.
        region = msg.region
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

    # -- vrings (vhost_user.vring does the work) -----------------------------------------------

    def _set_vring_num(self, msg: codec.SetVringNum) -> None:
        self.vrings.set_num(self.vrings.get(msg.index), msg.num)

    def _set_vring_addr(self, msg: codec.SetVringAddr) -> None:
        self.vrings.set_addr(self.vrings.get(msg.index), msg)

    def _set_vring_base(self, msg: codec.SetVringBase) -> None:
        self.vrings.set_base(self.vrings.get(msg.index), msg.num)

    def _get_vring_base(self, msg: codec.GetVringBase) -> codec.VringStateReply:
        ring = self.vrings.get(msg.index)
        return codec.VringStateReply(ring.index, self.vrings.get_base(ring))

    def _set_vring_kick(self, msg: codec.SetVringKick) -> None:
        ring = self.vrings.get(msg.index)
        fd = self._eventfd(msg.fd, "SET_VRING_KICK")
        if fd is None:
            raise FrontendProtocolError("SET_VRING_KICK: polling mode (no fd) is not supported")
        self.vrings.set_kick(ring, fd)

    def _set_vring_call(self, msg: codec.SetVringCall) -> None:
        ring = self.vrings.get(msg.index)
        self.vrings.set_call(ring, self._eventfd(msg.fd, "SET_VRING_CALL"))

    def _set_vring_err(self, msg: codec.SetVringErr) -> None:
        ring = self.vrings.get(msg.index)
        self.vrings.set_err(ring, self._eventfd(msg.fd, "SET_VRING_ERR"))

    def _set_vring_enable(self, msg: codec.SetVringEnable) -> None:
        self.vrings.set_enable(self.vrings.get(msg.index), msg.enable)

    # -- teardown ------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every ring (in-flight requests finish), quiesce the device, unmap memory and
        close every fd. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.vrings.close()
        try:
            self.device.quiesce()
        except Exception:
            self.log.exception("device quiesce failed")
        self._stop_logging()
        if self._dirty_log is not None:
            self._dirty_log.close()
            self._dirty_log = None
        if self._log_fd is not None:
            close_fds([self._log_fd])
            self._log_fd = None
        if self.vrings.inflight is not None:
            if self.vrings.inflight.state is not None:
                self._attach_state(None)
            self.vrings.inflight.close()
            self.vrings.inflight = None
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        close_fds([r.fd for r in self.regions])
        self.regions = []
        self._backend.close()
        self.transport.close()
