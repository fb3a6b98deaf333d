"""``image create|info|check``: the qcow2 image tools (qemu-img's output and exit codes)."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from blkdev.cli.common import UsageError, add_logging_options, parse_size


def add_parser(commands: Any) -> None:
    image = commands.add_parser("image", help="create, inspect and check qcow2 images")
    image_commands = image.add_subparsers(dest="image_command", required=True, metavar="ACTION")
    create = image_commands.add_parser("create", help="create a qcow2 image")
    create.add_argument("path")
    create.add_argument("size", type=parse_size, help="virtual size, e.g. 10G")
    create.add_argument("--cluster-size", type=parse_size, default=65536)
    create.add_argument("--backing-file", "-b", default=None)
    create.add_argument("--backing-format", "-F", choices=("raw", "qcow2"), default=None)
    info = image_commands.add_parser("info", help="print image facts as JSON (like qemu-img info)")
    info.add_argument("path", help="a file, or an RBD image as rbd:POOL/IMAGE[@SNAP][:...]")
    check = image_commands.add_parser("check", help="walk refcounts; report leaks and corruption")
    check.add_argument("path")
    check.add_argument("--output", choices=("human", "json"), default="human")
    for sub in (create, info, check):
        add_logging_options(sub)


def run(args: argparse.Namespace) -> int:
    from blkdev.disks import qcow

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
        if args.path.startswith("rbd:"):
            from blkdev.disks.rbd import rbd_image_info

            print(json.dumps(rbd_image_info(args.path), indent=4))
            return 0
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
