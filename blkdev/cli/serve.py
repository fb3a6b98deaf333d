"""``serve``: export one image on a vhost-user socket until a signal stops it."""

from __future__ import annotations

import argparse
import grp
import os
import signal
import stat
from collections.abc import Callable
from contextlib import ExitStack
from types import FrameType
from typing import Any

import structlog

from blkdev.cli.common import UsageError, add_logging_options
from blkdev.device import IO_THREADS, POLL_US
from blkdev.disks.disk import Disk

MAX_NUM_QUEUES = 64


def _num_queues(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= MAX_NUM_QUEUES:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_NUM_QUEUES}, not {value}")
    return value


def _queue_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1 or value > 32768 or value & (value - 1):
        raise argparse.ArgumentTypeError(f"must be a power of two up to 32768, not {value}")
    return value


def _whole_number(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number in ``low..high``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {low}..{high}, not {value}")
        return value

    return parse


_io_threads = _whole_number(0, 1024)
_poll_us = _whole_number(0, 1_000_000)


def _mode(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode") from None
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"{text} is not a permission mode (0..0777)")
    return value


def _group_id(name: str) -> int:
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise UsageError(f"--socket-group: no group named {name}") from None


def add_parser(commands: Any) -> None:
    serve = commands.add_parser(
        "serve",
        help="export an image on a vhost-user socket",
        description="Listen on SOCKET and serve IMAGE to each QEMU that connects, one at a time.",
    )
    serve.add_argument(
        "--socket",
        help=(
            "Unix socket path to create and listen on (optional under systemd socket "
            "activation: the socket passed is used, and must be this path if given)"
        ),
    )
    serve.add_argument(
        "--image",
        required=True,
        help=(
            "the disk image: a raw file, a block device, a qcow2 image, or a Ceph RBD image "
            "as rbd:POOL/IMAGE[@SNAP][:conf=PATH][:id=USER][:KEY=VALUE...] (QEMU's syntax)"
        ),
    )
    serve.add_argument(
        "--format",
        choices=("auto", "raw", "qcow2", "rbd"),
        default="auto",
        help=(
            "image format (default: auto; a probed qcow2 may not open a backing file, a probed "
            "raw image may not be given a qcow2 header)"
        ),
    )
    serve.add_argument(
        "--read-only", action="store_true", help="export read-only (guest writes fail)"
    )
    serve.add_argument("--num-queues", type=_num_queues, default=1, help="virtqueues (default 1)")
    serve.add_argument(
        "--queue-size", type=_queue_size, default=1024, help="largest virtqueue size (default 1024)"
    )
    serve.add_argument(
        "--io-threads",
        type=_io_threads,
        default=IO_THREADS,
        help=(
            f"I/O threads per queue for requests that wait for storage (default {IO_THREADS}; "
            "0 serves each queue's requests one at a time on its own thread)"
        ),
    )
    serve.add_argument(
        "--data-plane",
        choices=("c", "python"),
        default=os.environ.get("VHOST_USER_BLK_DATA_PLANE", "c"),
        help=(
            "c (default, or $VHOST_USER_BLK_DATA_PLANE): plain reads and writes of a raw image "
            "are served in C where it is built, the rest in Python; python: everything in Python"
        ),
    )
    serve.add_argument(
        "--poll-us",
        type=_poll_us,
        default=POLL_US,
        help=(
            f"busy-poll a busy queue's ring for up to N microseconds before sleeping (C data "
            f"plane; default {POLL_US}, 0: never)"
        ),
    )
    serve.add_argument("--serial", default="", help="serial number the guest sees (<= 20 bytes)")
    serve.add_argument(
        "--cache",
        choices=("writeback", "none"),
        default="writeback",
        help="host page cache use: writeback (default) or none (O_DIRECT)",
    )
    serve.add_argument(
        "--socket-group",
        metavar="GROUP",
        help="group of the socket file, for a QEMU running as another user (e.g. kvm)",
    )
    serve.add_argument(
        "--socket-mode",
        type=_mode,
        metavar="MODE",
        help="mode of the socket file, octal (e.g. 0660 with --socket-group; default: umask)",
    )
    serve.add_argument(
        "--control",
        metavar="PATH",
        help="control socket (JSON lines: query-status, query-stats, resize, ...; see `ctl`)",
    )
    serve.add_argument(
        "--metrics",
        metavar="[HOST:]PORT",
        help="serve Prometheus metrics over HTTP (a bare PORT listens on 127.0.0.1)",
    )
    serve.add_argument(
        "--incoming",
        action="store_true",
        help=(
            "be a live migration's destination: only look at the image (no lock, no write) "
            "until the migrated guest's rings start here"
        ),
    )
    serve.add_argument(
        "--no-follow-resize",
        action="store_true",
        help="do not follow the size of storage resized elsewhere (a block device's kernel "
        "resize events, an RBD image's header watch)",
    )
    add_logging_options(serve)


def check_socket_path(path: str) -> None:
    if len(os.fsencode(path)) >= 108:
        raise UsageError(f"socket path {path} is longer than Unix sockets allow (107 bytes)")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"socket folder {parent} does not exist: create it or choose another path")
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise UsageError(f"{path} exists and is not a socket: remove it or choose another path")


def run(args: argparse.Namespace) -> int:
    from blkdev import systemd
    from blkdev.control import Backend, ControlServer
    from blkdev.device import BlkDevice
    from blkdev.disks import open_disk
    from blkdev.resize import LiveResize
    from vhost_user.server import Server

    # pyroute2 and prometheus-client are imported only when asked for: each costs a tenth of
    # a second or more at start-up.

    if len(args.serial.encode()) > 20:
        raise UsageError("--serial must be at most 20 bytes (virtio-blk GET_ID)")
    try:
        fds = systemd.listen_fds()
        if len(fds) > 1:
            raise systemd.ActivationError(f"systemd passed {len(fds)} sockets; serve takes one")
        activated = systemd.activated_listener(fds[0], args.socket) if fds else None
    except systemd.ActivationError as exc:
        raise UsageError(str(exc)) from None
    if activated is None:
        if args.socket is None:
            raise UsageError("--socket is required (unless started by systemd socket activation)")
        check_socket_path(args.socket)
    elif args.socket_group is not None or args.socket_mode is not None:
        raise UsageError("--socket-group and --socket-mode: the socket unit sets those")
    group = _group_id(args.socket_group) if args.socket_group is not None else None
    if args.control is not None:
        check_socket_path(args.control)
    metrics_address = None
    if args.metrics is not None:
        from blkdev.metrics import parse_address

        try:
            metrics_address = parse_address(args.metrics)
        except ValueError as exc:
            raise UsageError(f"--metrics: {exc}") from None

    from blkdev.disks.handle import DiskHandle

    log = structlog.get_logger("vhost-user-blk")

    def opener() -> Disk:
        return open_disk(args.image, fmt=args.format, read_only=args.read_only, cache=args.cache)

    if args.incoming:
        # A migration's destination: the source holds the image until its VM stops. Look
        # only (read-only, no lock) for the config space; blkdev.disks.handle takes it later.
        first = open_disk(args.image, fmt=args.format, read_only=True, cache=args.cache, lock=False)
        is_path = first.format_name in ("raw", "qcow2")
        if is_path and not args.read_only and not os.access(args.image, os.W_OK):
            first.close()
            raise UsageError(f"{args.image} cannot be written: pass --read-only or fix its mode")
        disk = DiskHandle(opener, first, held=False, read_only=args.read_only)
    else:
        disk = DiskHandle(opener, opener())
    log.info(
        "image opened" if disk.held else "image looked at (incoming migration): not locked",
        image=args.image,
        format=disk.format_name,
        size=disk.size,
        read_only=disk.read_only,
    )
    try:
        with ExitStack() as stack:
            device = BlkDevice(
                disk,
                num_queues=args.num_queues,
                serial=args.serial,
                read_only=args.read_only,
                queue_size=args.queue_size,
                io_threads=args.io_threads,
                data_plane=args.data_plane,
                poll_us=args.poll_us,
            )
            if activated is not None:
                listener, path = activated
                server = Server(path, device, listener=listener)
                log.info("socket passed by systemd", socket=path)
            else:
                server = Server(
                    args.socket, device, socket_mode=args.socket_mode, socket_group=group
                )
            stack.callback(server.close)
            live = LiveResize(disk, device, server.notify_config_change)
            backend = Backend(
                image=args.image,
                disk=disk,
                device=device,
                connected=lambda: server.connection is not None,
                stop=server.stop,
                resize=None if disk.read_only else live.resize,
            )
            rdev = disk.rdev
            if rdev is not None and not args.no_follow_resize:
                from blkdev.uevents import ResizeWatcher

                watcher = ResizeWatcher(rdev, live.follow, name=args.image)
                try:
                    watcher.start()
                except OSError as exc:
                    log.warning("cannot follow resize events", error=str(exc))
                else:
                    stack.callback(watcher.stop)
            stop_following = None if args.no_follow_resize else disk.follow_size(live.follow)
            if stop_following is not None:
                stack.callback(stop_following)
            if args.control is not None:
                stack.enter_context(ControlServer(args.control, backend))
            if metrics_address is not None:
                from blkdev.metrics import MetricsServer

                metrics = stack.enter_context(MetricsServer(*metrics_address, backend))
                log.info("metrics listening", address="{}:{}".format(*metrics.address))

            received: list[int] = []

            def on_signal(signum: int, frame: FrameType | None) -> None:
                # Nothing but async-signal-safe work here. The handler runs in the main thread
                # between two bytecodes, possibly inside structlog's write, which holds a
                # non-reentrant lock: logging from here could deadlock the process.
                received.append(signum)
                server.stop()

            signal.signal(signal.SIGTERM, on_signal)
            signal.signal(signal.SIGINT, on_signal)
            systemd.notify(f"READY=1\nSTATUS=serving {args.image}")
            server.serve_forever()
            systemd.notify("STOPPING=1")
    finally:
        disk.close()
    if received:
        log.info("stopped by signal", signal=signal.Signals(received[0]).name)
    log.info("stopped: in-flight requests finished, image flushed and closed")
    return 0
