"""The ``vhost-user-blk`` command: one module per subcommand, each with ``add_parser`` and ``run``.

``serve`` exports one image on a vhost-user socket; ``image create|info|check`` are the qcow2
image tools. A mistake the user can fix (a bad argument, an unusable image, a socket path that
is taken) prints one ``vhost-user-blk: error: ...`` line naming the fix and exits 2, never a
traceback.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from types import ModuleType

from blkdev.cli import bench, ctl, image, serve
from blkdev.cli.common import PROG, OneLineParser, UsageError, fail
from blkdev.cli.logging_setup import configure_logging
from blkdev.errors import BlkdevError

COMMANDS: dict[str, ModuleType] = {"serve": serve, "image": image, "ctl": ctl, "bench": bench}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=PROG, description="A vhost-user-blk backend: serves a raw or qcow2 image to QEMU."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS.values():
        command.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_format, args.log_level)
    try:
        run: Callable[[argparse.Namespace], int] = COMMANDS[args.command].run
        return run(args)
    except (UsageError, BlkdevError) as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "))
