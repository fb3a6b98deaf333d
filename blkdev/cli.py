"""The ``vhost-user-blk`` command.

``serve`` exports one image on a vhost-user socket; ``image create|info|check`` are the qcow2
image tools. A mistake the user can fix (a bad argument, an unusable image, a socket path that
is taken) prints one ``vhost-user-blk: error: ...`` line naming the fix and exits 2, never a
traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import stat
import sys
from collections.abc import Sequence
from types import FrameType
from typing import NoReturn

import structlog

from blkdev.errors import BlkdevError
from blkdev.logging_setup import LOG_LEVELS, configure_logging

EXIT_USAGE = 2
MAX_NUM_QUEUES = 64
PROG = "vhost-user-blk"

_SIZE_SUFFIXES = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class UsageError(Exception):
    """The user asked for something that cannot work; the message says what to do instead."""


def parse_size(text: str) -> int:
    """``10G``, ``512M``, ``4096``, ``1.5G`` -> bytes (binary units, like qemu-img)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (examples: 4096, 512M, 10G)")
    return int(float(match.group(1)) * _SIZE_SUFFIXES[match.group(2).lower()])


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


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what is wrong, where to read more), exit 2."""

    def error(self, message: str) -> NoReturn:
        _fail(f"{message} (see: {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog=PROG, description="A vhost-user-blk backend: serves a raw or qcow2 image to QEMU."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="export an image on a vhost-user socket",
        description="Listen on SOCKET and serve IMAGE to each QEMU that connects, one at a time.",
    )
    serve.add_argument("--socket", required=True, help="Unix socket path to create and listen on")
    serve.add_argument(
        "--image", required=True, help="the disk image (raw file, block device, qcow2)"
    )
    serve.add_argument(
        "--format",
        choices=("auto", "raw", "qcow2"),
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
    serve.add_argument("--serial", default="", help="serial number the guest sees (<= 20 bytes)")
    serve.add_argument(
        "--cache",
        choices=("writeback", "none"),
        default="writeback",
        help="host page cache use: writeback (default) or none (O_DIRECT)",
    )
    _add_logging_options(serve)

    image = commands.add_parser("image", help="create, inspect and check qcow2 images")
    image_commands = image.add_subparsers(dest="image_command", required=True, metavar="ACTION")
    create = image_commands.add_parser("create", help="create a qcow2 image")
    create.add_argument("path")
    create.add_argument("size", type=parse_size, help="virtual size, e.g. 10G")
    create.add_argument("--cluster-size", type=parse_size, default=65536)
    create.add_argument("--backing-file", "-b", default=None)
    create.add_argument("--backing-format", "-F", choices=("raw", "qcow2"), default=None)
    info = image_commands.add_parser("info", help="print image facts as JSON (like qemu-img info)")
    info.add_argument("path")
    check = image_commands.add_parser("check", help="walk refcounts; report leaks and corruption")
    check.add_argument("path")
    check.add_argument("--output", choices=("human", "json"), default="human")
    for sub in (create, info, check):
        _add_logging_options(sub)
    return parser


def _add_logging_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-format", choices=("auto", "json", "console"), default="auto")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info")


def _fail(message: str) -> NoReturn:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def _check_socket_path(path: str) -> None:
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


def cmd_serve(args: argparse.Namespace) -> int:
    from blkdev.device import BlkDevice
    from blkdev.image import open_disk
    from vhost_user.server import Server

    if len(args.serial.encode()) > 20:
        raise UsageError("--serial must be at most 20 bytes (virtio-blk GET_ID)")
    _check_socket_path(args.socket)

    log = structlog.get_logger("vhost-user-blk")
    disk = open_disk(args.image, fmt=args.format, read_only=args.read_only, cache=args.cache)
    log.info(
        "image opened",
        image=args.image,
        format=getattr(disk, "format_name", args.format),
        size=disk.size,
        read_only=disk.read_only,
    )
    try:
        device = BlkDevice(
            disk,
            num_queues=args.num_queues,
            serial=args.serial,
            read_only=args.read_only,
            queue_size=args.queue_size,
        )
        server = Server(args.socket, device)

        received: list[int] = []

        def on_signal(signum: int, frame: FrameType | None) -> None:
            # Nothing but async-signal-safe work here. The handler runs in the main thread
            # between two bytecodes, possibly inside structlog's write, which holds a
            # non-reentrant lock: logging from here could deadlock the process.
            received.append(signum)
            server.stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        server.serve_forever()
    finally:
        disk.close()
    if received:
        log.info("stopped by signal", signal=signal.Signals(received[0]).name)
    log.info("stopped: in-flight requests finished, image flushed and closed")
    return 0


def cmd_image(args: argparse.Namespace) -> int:
    from blkdev import qcow

    if args.image_command == "create":
        if args.backing_format and not args.backing_file:
            raise UsageError("--backing-format needs --backing-file")
        if os.path.exists(args.path):
            raise UsageError(f"{args.path} exists: remove it first or choose another name")
        if args.backing_file is not None:
            # Relative backing names are resolved against the new image's folder, as on open.
            backing = os.path.join(os.path.dirname(os.path.abspath(args.path)), args.backing_file)
            if not os.path.isfile(backing):
                raise UsageError(f"backing file {backing} does not exist")
        try:
            qcow.create_image(
                args.path,
                args.size,
                cluster_size=args.cluster_size,
                backing_file=args.backing_file,
                backing_format=args.backing_format,
            )
        except ValueError as exc:  # a parameter qcow2 cannot represent
            raise UsageError(f"cannot create {args.path}: {exc}") from None
        print(
            f"Formatting '{args.path}', fmt=qcow2 size={args.size} cluster_size={args.cluster_size}"
        )
        return 0
    if args.image_command == "info":
        print(json.dumps(qcow.image_info(args.path), indent=4))
        return 0
    result = qcow.check_image(args.path)
    if args.output == "json":
        print(json.dumps(result.to_json(), indent=4))
    else:
        for problem in result.problems:
            print(problem)
        if result.corruptions == 0 and result.leaks == 0 and result.check_errors == 0:
            print("No errors were found on the image.")
        else:
            print(
                f"{result.corruptions} errors were found on the image, "
                f"{result.leaks} leaked clusters, {result.check_errors} check errors."
            )
    # Same exit codes as qemu-img check: 2 corruption, 3 leaks only.
    if result.corruptions or result.check_errors:
        return 2
    return 3 if result.leaks else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_format, args.log_level)
    try:
        if args.command == "serve":
            return cmd_serve(args)
        return cmd_image(args)
    except (UsageError, BlkdevError) as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "))


if __name__ == "__main__":
    sys.exit(main())
