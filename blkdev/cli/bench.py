"""``bench --socket PATH``: drive a vhost-user-blk backend (ours or any other) with no VM.

Prints IOPS, bandwidth, latency percentiles and, with ``--pid``, the backend's CPU per I/O
(``blkdev.bench``); ``--json`` prints the same as one JSON object. Exit codes: 0 the run
completed (with ``--verify``: and every block read back right), 1 requests failed or data did
not verify, 2 a usage error or a backend that could not be driven.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from blkdev import bench
from blkdev.cli.common import UsageError, add_logging_options, parse_size
from vhost_user.errors import VhostUserError
from vhost_user.frontend import FrontendError


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "bench",
        help="drive a vhost-user-blk backend with no VM and measure it",
        description="Connect to SOCKET as QEMU would and drive its queues like a guest driver.",
    )
    p.add_argument("--socket", required=True, help="the backend's vhost-user socket")
    p.add_argument("--rw", choices=bench.RW, default="randread", help="pattern (default randread)")
    p.add_argument("--bs", type=parse_size, default=4096, help="block size (default 4k)")
    p.add_argument("--iodepth", type=int, default=32, help="requests in flight per queue (32)")
    p.add_argument("--queues", type=int, default=1, help="queues driven, one thread each (1)")
    p.add_argument("--seconds", type=float, default=5.0, help="run time (default 5)")
    p.add_argument(
        "--no-event-idx", action="store_true", help="do not negotiate VIRTIO_RING_F_EVENT_IDX"
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="write checksummed blocks, then read every one back and check it (Python loop)",
    )
    p.add_argument("--pid", type=int, help="the backend's pid, for its CPU time per I/O")
    p.add_argument("--python", action="store_true", help="use the Python loop, not the C one")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_logging_options(p)


def run(args: argparse.Namespace) -> int:
    opts = bench.Options(
        socket=args.socket,
        rw=args.rw,
        bs=args.bs,
        iodepth=args.iodepth,
        queues=args.queues,
        seconds=args.seconds,
        event_idx=not args.no_event_idx,
        verify=args.verify,
        pid=args.pid,
        python=args.python,
    )
    try:
        opts.check()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        report = bench.run(opts, progress=lambda text: print(text, file=sys.stderr))
    except (FrontendError, VhostUserError, RuntimeError) as exc:
        raise UsageError(f"{args.socket}: {exc}") from None
    print(json.dumps(report.as_dict()) if args.json else report.text())
    return 1 if report.errors or report.mismatches else 0
