"""``ctl PATH COMMAND [ARGS]``: send one command to a running backend's control socket.

``ctl PATH query-status``, ``ctl PATH query-stats`` (the reply's value, as JSON, on stdout),
``ctl PATH resize 2G [--force]``, ``ctl PATH set-log-level debug``, ``ctl PATH quit``.

Exit codes: 0 the command succeeded, 1 the backend replied with an error (its class and
description on stderr), 2 a usage error or no usable answer (cannot connect, the connection
closed or timed out before the reply): one ``vhost-user-blk: error: ...`` line.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from typing import Any

from blkdev import control
from blkdev.cli.common import PROG, UsageError, add_logging_options, parse_size

EXIT_ERROR_REPLY = 1
MAX_REPLY = 16 << 20
"""Longest reply accepted (``query-stats`` of 64 queues is about 100 KiB)."""


def add_parser(commands: Any) -> None:
    ctl = commands.add_parser(
        "ctl",
        help="send a command to a running backend's control socket",
        description="Send COMMAND to the control socket PATH of `serve --control PATH`.",
    )
    ctl.add_argument("path", metavar="PATH", help="the control socket (serve --control PATH)")
    ctl.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for the reply (default 60)"
    )
    add_logging_options(ctl)
    actions = ctl.add_subparsers(dest="ctl_command", required=True, metavar="COMMAND")
    actions.add_parser("query-status", help="image, format, size, queues, front-end, uptime")
    actions.add_parser("query-stats", help="per-queue and per-disk request statistics")
    resize = actions.add_parser("resize", help="grow (or with --force shrink) the image")
    resize.add_argument("size", type=parse_size, help="new size: bytes, or with K/M/G/T")
    resize.add_argument("--force", action="store_true", help="allow shrinking the image")
    level = actions.add_parser("set-log-level", help="change the backend's log level")
    level.add_argument("level", choices=control.LOG_LEVELS)
    actions.add_parser("quit", help="stop the backend (as SIGTERM does)")


def _command(args: argparse.Namespace) -> control.Command:
    if args.ctl_command == "resize":
        return control.Resize(args.size, args.force)
    if args.ctl_command == "set-log-level":
        return control.SetLogLevel(args.level)
    simple: dict[str, control.Command] = {
        "query-status": control.QueryStatus(),
        "query-stats": control.QueryStats(),
        "quit": control.Quit(),
    }
    return simple[args.ctl_command]


def exchange(path: str, line: bytes, timeout: float) -> Any:
    """Send one request line to the control socket at ``path``; return the decoded reply.
    UsageError (exit 2) for anything that leaves no reply to show."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    with sock:
        try:
            sock.connect(path)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise UsageError(
                f"cannot connect to control socket {path}: {reason} "
                "(is `serve --control` running on it?)"
            ) from None
        reply = bytearray()
        try:
            sock.sendall(line)
            while b"\n" not in reply:
                chunk = sock.recv(1 << 16)
                if not chunk:
                    raise UsageError(f"control socket {path} closed the connection without a reply")
                reply += chunk
                if len(reply) > MAX_REPLY:
                    raise UsageError(f"control socket {path} sent a reply over {MAX_REPLY} bytes")
        except TimeoutError:
            raise UsageError(f"no reply from control socket {path} within {timeout:g} s") from None
        except OSError as exc:
            raise UsageError(f"control socket {path}: {exc.strerror or exc}") from None
    try:
        decoded = json.loads(reply[: reply.index(b"\n")])
    except ValueError:
        raise UsageError(f"control socket {path} sent a reply that is not JSON") from None
    if not isinstance(decoded, dict) or not ("return" in decoded or "error" in decoded):
        raise UsageError(f"control socket {path} sent a reply without return or error")
    return decoded


def run(args: argparse.Namespace) -> int:
    if args.timeout <= 0:
        raise UsageError("--timeout must be more than 0 seconds")
    reply = exchange(args.path, control.encode_request(_command(args)), args.timeout)
    if "error" in reply:
        error = reply["error"]
        if isinstance(error, dict):
            print(f"{PROG}: {error.get('class')}: {error.get('desc')}", file=sys.stderr)
        else:
            print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_ERROR_REPLY
    value = reply["return"]
    if value != {}:
        print(json.dumps(value, indent=2))
    return 0
